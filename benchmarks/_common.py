"""Shared plumbing of the benchmarks: arguments, paired timing, reports, local servers.

Owns: the ``--smoke``/``--quick``/``--json`` command line every benchmark
takes, the measurement discipline (warm-up outside the clock, several rounds,
medians, ratios taken per round between paths measured back to back, answers
verified outside the clock), the rows that store benchmarks put in their
tables (``key_values``: a pure function of the key, so any reply can be
checked), the rich report with the ratio before the absolute figure, and
starting/stopping a throwaway ``redis-server`` on loopback. It must not know
what any benchmark measures.

Every benchmark module holds ``KEYS``, the keys of the JSON object that
``--json`` prints; ``tests/test_benchmarks.py`` runs each with ``--smoke
--json`` and checks them.

Thread safety: single-threaded helpers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

__all__ = [
    "Report",
    "Wrong",
    "bench_args",
    "check_rows",
    "console",
    "emit_json",
    "finish",
    "key_values",
    "paired_rates",
    "progress",
    "redis_server",
    "size",
]

console = Console(stderr=True)


def bench_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, a few seconds: checks that the benchmark runs and verifies, "
                   "its figures mean nothing")
    p.add_argument("--quick", action="store_true", help="smaller sizes, finishes in under 60 s")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--rounds", type=int, default=0, help="timed rounds per figure (default 5, quick 3)")
    return p.parse_args(argv)


def size(args: argparse.Namespace, full: Any, quick: Any, smoke: Any) -> Any:
    """The value for the run's size: ``--smoke`` wins over ``--quick``."""
    return smoke if args.smoke else quick if args.quick else full


class Wrong(AssertionError):
    """A benchmark path returned a wrong answer: its figure would be meaningless."""


_VALUE_STRIDE = 1 << 16  # column d adds d * 2**16: below 2**22 at dim 64, so float32 stays exact


def key_values(keys: np.ndarray, dim: int, dtype: Any = np.float32) -> np.ndarray:
    """(B, dim) rows that are a pure function of each key: what store benchmarks insert.

    Element d of key k is ``((k >> 16 * (d % 4)) & 0xFFFF) + d * 2**16``: the
    first four columns hold all 64 bits of the key, so a row read for the wrong
    key (or a stale or zeroed row) differs from the right one, and every element
    is an integer below 2**24 (exact in float32), so checks compare with ``==``.

    Requires: dim <= 255.
    """
    k = np.ascontiguousarray(keys, dtype=np.uint64)
    d = np.arange(dim, dtype=np.uint64)
    shifts = np.uint64(16) * (d % np.uint64(4))
    out = np.empty((k.shape[0], dim), dtype=dtype)
    for lo in range(0, k.shape[0], 4096):  # cache-sized temporaries
        part = (k[lo:lo + 4096, None] >> shifts[None, :]) & np.uint64(0xFFFF)
        out[lo:lo + 4096] = part + d * np.uint64(_VALUE_STRIDE)
    return out


def check_rows(what: str, keys: np.ndarray, out: np.ndarray, present: np.ndarray | None = None) -> None:
    """Raise ``Wrong`` unless ``out`` holds ``key_values(keys)`` (zeros where not ``present``).

    Args:
        what: names the path and batch in the message.
        present: (B,) bool, which keys the table holds (None: all of them).
    """
    want = key_values(keys, out.shape[1], out.dtype)
    if present is not None:
        want[~present] = 0
    bad = np.flatnonzero((out != want).any(axis=1))
    if bad.size:
        i = int(bad[0])
        raise Wrong(f"{what}: {bad.size} of {keys.size} rows wrong; key {int(keys[i])}: "
                    f"got {out[i, :4]}..., want {want[i, :4]}...")


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def paired_rates(
    paths: dict[str, Callable[[], int]], rounds: int, min_seconds: float = 0.4,
    verify: dict[str, Callable[[], None]] | None = None, verify_every: int = 8,
) -> dict[str, list[float]]:
    """Items/s of each path, measured back to back in every round.

    Each callable does one unit of work and returns how many items it handled.
    Every round runs each path for at least ``min_seconds`` of its own calls;
    paths alternate within a round so slow drifts of the machine hit all of
    them alike, and a ratio taken per round compares paths measured moments apart.

    ``verify[name]``, when given, checks the answer of the call just made
    (raising ``Wrong``); it runs after the warm-up call, after every
    ``verify_every``-th timed call and after each round's last call, with the
    clock stopped: only the calls themselves are timed.
    """
    verify = verify or {}
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for name, fn in paths.items():
        fn()  # warm-up: compile, fault in pages, fill caches
        if name in verify:
            verify[name]()
    for _ in range(rounds):
        for name, fn in paths.items():
            check = verify.get(name)
            items = calls = 0
            dt = 0.0
            while dt < min_seconds:
                t0 = time.perf_counter()
                items += fn()
                dt += time.perf_counter() - t0
                calls += 1
                if check is not None and (calls % verify_every == 0 or dt >= min_seconds):
                    check()
            rates[name].append(items / dt)
    return rates


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def ratio(a: list[float], b: list[float]) -> float:
    """Median of per-round ratios a/b (paired, so machine drift cancels)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


@dataclass
class Report:
    """Rows of 'ratio first, absolute second', printed as one table."""

    title: str
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: str, ratio_text: str, absolute: str, target: str = "") -> None:
        self.rows.append((figure, ratio_text, absolute, target))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def print(self) -> None:
        t = Table(title=self.title, title_justify="left")
        t.add_column("figure")
        t.add_column("ratio", justify="right")
        t.add_column("absolute", justify="right")
        t.add_column("target")
        for row in self.rows:
            t.add_row(*row)
        console.print(t)
        for n in self.notes:
            console.print(f"  - {n}")


def finish(report: Report, figures: dict[str, Any], as_json: bool) -> dict[str, Any]:
    """Print the report, then the figures as JSON if asked; return the figures."""
    report.print()
    if as_json:
        emit_json(figures)
    return figures


def emit_json(obj: dict[str, Any]) -> None:
    """The benchmark's figures as one JSON object on the last line of stdout."""
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
    sys.stdout.flush()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_server(maxmemory_mb: int = 0) -> Iterator[tuple[str, int] | str]:
    """A throwaway redis-server on 127.0.0.1, no persistence; stopped on exit.

    Yields ``(host, port)``, or a string saying why there is none (the binary or
    the Python client is missing), so the caller can print it and skip.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        yield "redis-server is not installed (Debian: apt-get install -y redis-server)"
        return
    try:
        import redis  # noqa: F401
    except ImportError:
        yield "the redis Python client is not installed (pip install 'streamrec[bench]')"
        return
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="streamrec-redis-")
    args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
            "--dir", workdir, "--protected-mode", "yes"]
    if maxmemory_mb:
        args += ["--maxmemory", f"{maxmemory_mb}mb"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    yield f"redis-server did not start (exit code {proc.poll()})"
                    return
                time.sleep(0.05)
        yield ("127.0.0.1", port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
