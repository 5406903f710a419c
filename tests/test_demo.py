"""``streamrec demo --quick``: the whole system end to end, as the README's first command runs it.

It runs as a user would (a subprocess of the installed command, in its own directory) and must end
with exit status 0 (no failed ranking request, no failed or wrong PS call), the summary table, and a
report whose plots exist; the model must have learnt something (its progressive AUC above chance).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_quick_runs_the_whole_system(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "160"}
    cmd = [sys.executable, "-m", "streamrec.cli", "demo", "--quick", "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "streamrec demo: summary" in out
    auc = re.search(r"click AUC \(progressive\) / best achievable\s*│\s*([0-9.]+) / ([0-9.]+)", out)
    assert auc is not None, out[-3000:]
    assert float(auc.group(1)) > 0.55 and float(auc.group(2)) > float(auc.group(1)) - 0.02
    report = (tmp_path / "out" / "report.md").read_text()
    for png in ("auc.png", "latency.png", "qps.png"):
        assert f"]({png})" in report and (tmp_path / "out" / png).stat().st_size > 1000
    assert (tmp_path / "out" / "model" / "CURRENT").exists()
