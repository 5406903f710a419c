"""Shared test settings: the hypothesis profiles the whole suite runs under, and the suite's order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Tables are created per example, and the first example of a session may pay
# numba's cache load, so no per-example deadline; examples stay modest.
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


# The parts whose tests fork (store snapshots fork the process; ps and transport start servers) run
# first, before tests that load torch and Flink's JVM gateway into this process: a fork copies the
# parent's page tables, and with torch and a gateway loaded the store's fork-heavy property tests ran
# about 3x slower (TestSequenceModel: 12 s alone, 33 s after importing torch and starting a gateway).
# The store goes first of all: its tests compile (and cache) the kernels that the servers of the ps
# tests would otherwise compile in the middle of a timed fault test.
_FIRST = ("store", "transport", "cluster", "ps")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent

    def rank(item: pytest.Item) -> int:
        try:
            part = item.path.relative_to(here).parts[0]
        except ValueError:
            return len(_FIRST)
        return _FIRST.index(part) if part in _FIRST else len(_FIRST)

    items.sort(key=rank)  # stable: each module's tests stay together and in order
