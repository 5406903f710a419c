"""``streamrec serve`` as its own process: it loads the model directory's current version, answers
/rank with that model's scores and a config file's settings, and exits cleanly on SIGTERM."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from streamrec.model.checkpoint import publish
from tests.serving.conftest import NOW_MS, direct_scores, small_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_streamrec_serve_process(tmp_path: Path) -> None:
    model = small_model(seed=3)
    publish(tmp_path / "m", model.state_dict(), fsync=False,
            model_config={"class": "STCA", **dataclasses.asdict(model.config)})
    (tmp_path / "serve.toml").write_text("[serve]\nmax_candidates = 50\nmodel_name = \"ranker\"\n")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    argv = ["serve", "--model-dir", str(tmp_path / "m"), "--config", str(tmp_path / "serve.toml"),
            "--port", str(port)]
    proc = subprocess.Popen([sys.executable, "-m", "streamrec.cli", *argv],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "the server did not become ready"
            time.sleep(0.2)
        items = np.array([1, 2, 3, 40])
        r = httpx.post(f"{url}/rank", json={"user_id": 5, "item_ids": items.tolist(), "ts_ms": NOW_MS})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()["scores"]), direct_scores(model, None, 5, items),
                                   rtol=1e-4, atol=1e-6)
        assert httpx.post(f"{url}/rank", json={"user_id": 5, "item_ids": list(range(51))}).status_code == 400
        assert httpx.get(f"{url}/v2/models/ranker/ready").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
