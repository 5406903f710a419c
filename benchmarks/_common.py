"""Shared plumbing of the benchmarks: arguments, paired timing, reports, local servers.

Owns: the ``--quick``/``--json`` command line every benchmark takes, the
measurement discipline (warm-up outside the clock, several rounds, medians,
ratios taken per round between paths measured back to back), the rich report
with the ratio before the absolute figure, and starting/stopping a throwaway
``redis-server`` on loopback. It must not know what any benchmark measures.

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

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

__all__ = [
    "Report",
    "bench_args",
    "console",
    "emit_json",
    "finish",
    "paired_rates",
    "progress",
    "redis_server",
]

console = Console(stderr=True)


def bench_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smaller sizes, finishes in under 60 s")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--rounds", type=int, default=0, help="timed rounds per figure (default 5, quick 3)")
    return p.parse_args(argv)


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
    paths: dict[str, Callable[[], int]], rounds: int, min_seconds: float = 0.4
) -> dict[str, list[float]]:
    """Items/s of each path, measured back to back in every round.

    Each callable does one unit of work and returns how many items it handled.
    Every round runs each path for at least ``min_seconds``; paths alternate
    within a round so slow drifts of the machine hit all of them alike, and a
    ratio taken per round compares paths measured moments apart.
    """
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for fn in paths.values():
        fn()  # warm-up: compile, fault in pages, fill caches
    for _ in range(rounds):
        for name, fn in paths.items():
            items = 0
            t0 = time.perf_counter()
            while True:
                items += fn()
                dt = time.perf_counter() - t0
                if dt >= min_seconds:
                    break
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
