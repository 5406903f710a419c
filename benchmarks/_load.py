"""Closed-loop HTTP load for benchmarks/serving.py, run as its own process.

Owns: one load process: ``concurrency`` asyncio loops on one ``httpx.AsyncClient``, each sending
its next request as soon as the previous one is answered (closed loop), for ``duration`` seconds,
cycling through the requests of a workload file. It reports, as JSON on stdout: the count and
latency (ms) of each answered request by status, the wall time, and the scores of every
``sample_every``-th request (with its index) so the caller can check them against the model.
It imports only httpx, numpy and orjson, so starting it costs well under a second.

Thread safety: a process of its own; nothing shared.

Usage: ``python benchmarks/_load.py URL PATH WORKLOAD.npz CONCURRENCY DURATION_S SEED SAMPLE_EVERY``.
"""

from __future__ import annotations

import asyncio
import sys
import time

import httpx
import numpy as np
import orjson


async def _run(url: str, path: str, workload: str, concurrency: int, duration: float, seed: int,
               sample_every: int) -> dict:
    w = np.load(workload)
    users, offsets, items, ts = w["users"], w["offsets"], w["items"], int(w["ts_ms"])
    bodies = [orjson.dumps({"user_id": u, "item_ids": items[offsets[i]:offsets[i + 1]].tolist(), "ts_ms": ts})
              for i, u in enumerate(users.tolist())]
    n = len(bodies)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    lat: dict[int, list[float]] = {}
    samples: list[tuple[int, list]] = []
    counter = [0]
    end = time.perf_counter() + duration
    headers = {"content-type": "application/json"}

    async def loop(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < end:
            k = counter[0]
            counter[0] += 1
            i = int(order[k % n])
            t0 = time.perf_counter()
            r = await client.post(path, content=bodies[i], headers=headers)
            dt = (time.perf_counter() - t0) * 1e3
            lat.setdefault(r.status_code, []).append(dt)
            if r.status_code == 200 and sample_every and k % sample_every == 0:
                samples.append((i, orjson.loads(r.content)["scores"]))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "latency_ms": {str(k): v for k, v in lat.items()}, "samples": samples}


def main() -> None:
    url, path, workload, conc, dur, seed, every = sys.argv[1:8]
    out = asyncio.run(_run(url, path, workload, int(conc), float(dur), int(seed), int(every)))
    sys.stdout.buffer.write(orjson.dumps(out) + b"\n")


if __name__ == "__main__":
    main()
