"""Shared test settings: the hypothesis profiles the whole suite runs under."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Tables are created per example, and the first example of a session may pay
# numba's cache load, so no per-example deadline; examples stay modest so the
# suite runs in well under four minutes on two cores.
settings.register_profile(
    "default",
    deadline=None,
    # 60 keeps the default suite under 10 minutes on 2 cores with every part's model tests in it;
    # HYPOTHESIS_PROFILE=ci runs 1,000 per test.
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
# Longer runs for CI or a hunt for rare interleavings: HYPOTHESIS_PROFILE=ci.
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=1000,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
