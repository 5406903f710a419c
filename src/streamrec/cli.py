"""The ``streamrec`` command.

Owns: argument parsing and dispatch for every subcommand; each subcommand is a
thin shell over a library call, so everything it does is also reachable from
Python. It may import every package of ours.

Subcommands:
    demo [--quick] [--out DIR]      the main job: traffic -> pipeline -> STCA online -> PS -> serving
    demo ps                         the parameter server alone on loopback, failover included
    bench NAME [--smoke|--quick] [--json]
                                    run ``benchmarks/NAME.py`` (``bench --list`` lists them;
                                    ``bench ps_ab --base REV`` compares the TCP path with REV);
                                    arguments after ``--`` go to the benchmark as they are
    config defaults | check FILE    the table config format with every default; check a file
    serve --model-dir DIR [--config serve.toml]
                                    the ranking server (Open Inference Protocol v2 and /rank)
    generate --out DIR [--events N] generated traffic (impressions, actions, catalog) as rolling files
    ps serve --config F --node N    run one storage node of a cluster spec
    ps check FILE                   validate a cluster spec and print its placement
    pipeline run --config F         the sample pipeline in this process (join, features, Parquet,
                                    checkpoints; resumes from the last checkpoint)

Thread safety: a command-line entry point; runs once per process.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streamrec.cluster.spec import ClusterSpec

__all__ = ["main"]

_DEFAULTS_TOML = """\
# streamrec configuration: every field with its default.
# A file may hold any subset; unknown fields are errors that name the field.

[table]
dim = 64                  # required: embedding elements per row
dtype = "float32"         # "float32" or "float64"
capacity = 1024           # keys the index is first sized for; it grows past this by doubling
max_rows = 0              # row-arena reservation; 0 = 2**31 rows of address space (no memory until used)
optimizer = "none"        # "none" (plain SGD), "adagrad" or "adam"
huge_pages = true         # back the arena and index with 2 MiB transparent huge pages
ttl_s = 0                 # rows expire this long after their last write; 0 = never
ttl_slice_s = 0           # expiry slice width; 0 = ttl_s / 16 (at least 1 s)
max_live_rows = 0         # row limit; at the limit new keys evict by `eviction`; 0 = none
eviction = "lru"          # "lru" or "lfu"
eviction_sample = 8       # rows sampled per eviction (Redis-style approximation)
lfu_decay_min = 1         # LFU counts halve every this many minutes (Redis's default)
admit_after = 0           # rows only for keys seen this many times by find_or_insert; 0 = all
admission_sketch_width = 1048576  # count-min sketch counters per row (4 rows of uint8)

[table.adagrad]           # read when optimizer = "adagrad"
eps = 1e-10               # PyTorch's default
initial_accumulator = 0.0 # PyTorch's default (TensorFlow: 0.1)

[table.adam]              # read when optimizer = "adam"
beta1 = 0.9
beta2 = 0.999
eps = 1e-8

[table.initializer]       # new rows are a pure function of (key, seed): replicas agree
kind = "normal"           # zeros, constant, uniform, normal, truncated_normal
mean = 0.0
std = 0.01
low = -0.01               # uniform
high = 0.01               # uniform
value = 0.0               # constant
seed = 0
"""


def _benchmarks_dir() -> Path | None:
    """``benchmarks/`` of the source checkout this package runs from, or of $STREAMREC_BENCHMARKS."""
    env = os.environ.get("STREAMREC_BENCHMARKS")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "benchmarks"
        if cand.is_dir() and (cand / "_common.py").exists():
            return cand
    cand = Path.cwd() / "benchmarks"
    return cand if cand.is_dir() else None


def _bench(args: argparse.Namespace) -> int:
    bdir = _benchmarks_dir()
    if bdir is None:
        print("streamrec bench: no benchmarks/ directory found; run from a source checkout "
              "or set STREAMREC_BENCHMARKS", file=sys.stderr)
        return 2
    names = sorted(p.stem for p in bdir.glob("*.py") if not p.name.startswith("_"))
    if args.list or not args.name:
        print("\n".join(names))
        return 0
    if args.name not in names:
        print(f"streamrec bench: unknown benchmark {args.name!r}; known: {', '.join(names)}",
              file=sys.stderr)
        return 2
    argv = [str(bdir / f"{args.name}.py")]
    argv += ["--smoke"] if args.smoke else []
    argv += ["--quick"] if args.quick else []
    argv += ["--json"] if args.json else []
    argv += ["--rounds", str(args.rounds)] if args.rounds else []
    argv += ["--base", args.base] if args.base else []
    argv += [a for a in args.extra if a != "--"]
    old = sys.argv
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    finally:
        sys.argv = old
    return 0


def _config(args: argparse.Namespace) -> int:
    if args.what == "defaults":
        sys.stdout.write(_DEFAULTS_TOML)
        return 0
    from streamrec.config import load_table_config
    from streamrec.errors import ConfigError

    try:
        cfg = load_table_config(args.file)
    except ConfigError as exc:
        print(f"streamrec config check: {exc}", file=sys.stderr)
        return 1
    print(cfg)
    return 0


def _ps(args: argparse.Namespace) -> int:
    import logging

    from streamrec.cluster.spec import load_cluster_spec
    from streamrec.errors import ConfigError

    try:
        spec = load_cluster_spec(args.config if args.what in ("serve", "dump", "status") else args.file)
        if args.what in ("serve", "dump"):
            spec.node(args.node)
    except (ConfigError, OSError) as exc:
        print(f"streamrec ps {args.what}: {exc}", file=sys.stderr)
        return 1
    if args.what == "check":
        for t, table in enumerate(spec.tables):
            for s in range(table.shards):
                print(f"{table.name}[{s}]: {', '.join(spec.replicas(t, s))}")
            if table.serving:
                print(f"{table.name} read-only (fanout {table.fanout}): {', '.join(table.serving)}")
        return 0
    if args.what == "dump":
        return _ps_dump(spec, args)
    if args.what == "status":
        import json

        from streamrec.ps._status import cluster_status, format_status

        rows = cluster_status(spec, timeout_s=args.timeout)
        print(json.dumps(rows) if args.json else format_status(rows))
        return 0
    from streamrec.ps.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        serve(spec, args.node, workers=args.workers, shm=not args.no_shm, rdma=args.rdma,
              fill_from_peers=not args.no_fill)
    except OSError as exc:
        print(f"streamrec ps serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _ps_dump(spec: ClusterSpec, args: argparse.Namespace) -> int:
    import numpy as np

    from streamrec.errors import ConfigError, StreamrecError
    from streamrec.ps.client import PSClient

    shards, keys, values, expires = [], [], [], []
    try:
        with PSClient(spec, transports=("tcp",), timeout_s=args.timeout) as client:
            for s, k, v, e in client.export(args.table, args.node):
                shards.append(np.full(k.size, s, np.int64))
                keys.append(k)
                values.append(v)
                expires.append(e)
    except (ConfigError, StreamrecError) as exc:
        print(f"streamrec ps dump: {exc}", file=sys.stderr)
        return 1
    shard = np.concatenate(shards) if shards else np.empty(0, np.int64)
    t = spec.table(args.table)[0]
    for s in range(spec.tables[t].shards):
        if args.node in spec.replicas(t, s):
            print(f"{args.table}[{s}] on {args.node}: {int(np.count_nonzero(shard == s))} rows")
    if args.out:
        np.savez(args.out, shard=shard,
                 keys=np.concatenate(keys) if keys else np.empty(0, np.uint64),
                 values=np.concatenate(values) if values else np.empty((0, 0), np.float32),
                 expires_at=np.concatenate(expires) if expires else np.empty(0, np.int64))
        print(f"wrote {args.out}")
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from streamrec.errors import ConfigError
    from streamrec.pipeline.runner import EmbeddedRunner, load_pipeline_config

    try:
        cfg = load_pipeline_config(args.config)
        runner = EmbeddedRunner(cfg, resume=not args.restart)
    except ConfigError as exc:
        print(f"streamrec pipeline run: {exc}", file=sys.stderr)
        return 2
    stats = runner.run(max_batches=args.max_batches)
    print(f"{stats.events:,} events, {stats.samples:,} samples in {stats.batches:,} micro-batches, "
          f"{stats.checkpoints} checkpoints, {stats.files} files in {cfg.output}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from streamrec.serving import ServeConfig
    from streamrec.serving.server import serve

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("executor", args.executor))
                 if v is not None}
    cfg = ServeConfig.from_toml(args.config, **overrides) if args.config else ServeConfig.from_dict(overrides)
    serve(args.model_dir, cfg, sequences=args.sequences, counters=args.counters)
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.what == "ps":
        from streamrec.demo_ps import run_demo

        return 0 if run_demo(seconds_per_phase=args.seconds, rows=args.rows).ok else 1
    from streamrec.demo import FULL, QUICK, run_system_demo

    return run_system_demo(QUICK if args.quick else FULL, out_dir=args.out)


def _generate(args: argparse.Namespace) -> int:
    import dataclasses

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from streamrec.pipeline.generate import (
        GeneratorConfig,
        load_generator_config,
        write_events,
        write_histories,
    )

    overrides = {k: v for k, v in (("seed", args.seed), ("users", args.users), ("items", args.items),
                                   ("impressions_per_s", args.rate)) if v is not None}
    cfg = load_generator_config(args.config, **overrides) if args.config else \
        dataclasses.replace(GeneratorConfig(), **overrides)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        if args.histories:
            task = bar.add_task("histories (users)", total=cfg.users)
            write_histories(cfg, args.histories, Path(args.out) / "histories.parquet",
                            on_chunk=lambda n: bar.advance(task, n))
        task = bar.add_task("events", total=args.events)
        counts = write_events(cfg, args.out, events=args.events, fmt=args.format,
                              rows_per_file=args.rows_per_file, on_step=lambda n: bar.advance(task, n))
    print(f"wrote {counts['impressions']:,} impressions and {counts['actions']:,} actions in "
          f"{counts['files']} {args.format} files under {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from streamrec.model.train import run_command

    return run_command(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamrec",
        description="Real-time recommendation infrastructure: embedding store, parameter server, "
        "streaming samples, long-sequence ranking, serving.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    b = sub.add_parser("bench", help="run a benchmark from benchmarks/",
                       description="Run benchmarks/NAME.py; every benchmark prints its baseline "
                       "beside it (ratio first, absolute second).")
    b.add_argument("name", nargs="?", help="benchmark name (see --list)")
    b.add_argument("--list", action="store_true", help="list the benchmarks")
    b.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds: checks that it runs")
    b.add_argument("--quick", action="store_true", help="smaller sizes, under 60 s")
    b.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    b.add_argument("--rounds", type=int, default=0, help="timed rounds per figure")
    b.add_argument("--base", help="git revision to compare against (ps_ab)")
    b.add_argument("extra", nargs=argparse.REMAINDER,
                   help="after --: further arguments for the benchmark (e.g. -- --plot out.png)")
    b.set_defaults(func=_bench)

    c = sub.add_parser("config", help="show the config file format or check a file",
                       description="'defaults' prints every field with its default; "
                       "'check FILE' validates a TOML file and prints what it configures.")
    c.add_argument("what", choices=["defaults", "check"])
    c.add_argument("file", nargs="?", help="TOML file, for 'check'")
    c.set_defaults(func=_config)

    d = sub.add_parser("demo", help="the whole system end to end (the main job); 'demo ps': the PS alone",
                       description="The whole system on the embedded default, no servers to start by hand: "
                       "generated traffic through the pipeline (join + features), STCA trained online on "
                       "its samples, the parameter server's storage processes and failover, the ranking "
                       "server on the published model under a closed-loop load; a summary table and a "
                       "report with plots in --out. 'streamrec demo ps' runs the parameter-server demo "
                       "alone: a small cluster on loopback, lookups over every transport, a replica "
                       "killed and restarted under load.")
    d.add_argument("what", nargs="?", choices=("system", "ps"), default="system",
                   help="'system' (default) or 'ps'")
    d.add_argument("--quick", action="store_true", help="smaller sizes (under 90 s on 2 cores)")
    d.add_argument("--out", default="demo-out", help="report directory (default ./demo-out)")
    d.add_argument("--rows", type=int, default=1_000_000, help="demo ps: rows to load (default 1,000,000)")
    d.add_argument("--seconds", type=float, default=4.0, help="demo ps: seconds per load phase (default 4)")
    d.set_defaults(func=_demo)

    g = sub.add_parser("generate", help="generated traffic: impressions, actions, catalog (rolling files)",
                       description="Write generated traffic from the hidden ground-truth model "
                       "(pipeline/generate.py) to OUT/impressions/ and OUT/actions/ as rolling files (each "
                       "appears by rename, so `pipeline run` can tail the directory), with catalog.parquet "
                       "and generator.json. Deterministic by seed.")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--format", choices=["parquet", "jsonl", "csv"], default="parquet",
                   help="file format (default parquet)")
    g.add_argument("--events", type=int, default=10_000_000,
                   help="rows (impressions plus actions) to write, at least (default 10,000,000)")
    g.add_argument("--seed", type=int, help="seed (default: the config's, 0)")
    g.add_argument("--config", help="TOML file with GeneratorConfig fields (top level or [generate])")
    g.add_argument("--users", type=int, help="users (default 10,000)")
    g.add_argument("--items", type=int, help="items (default 100,000)")
    g.add_argument("--rate", type=float, help="impressions per simulated second (default 100,000)")
    g.add_argument("--rows-per-file", type=int, default=1_000_000, help="rows per file (default 1,000,000)")
    g.add_argument("--histories", type=int, default=0,
                   help="also write each user's last N actions before the stream to histories.parquet")
    g.set_defaults(func=_generate)

    t = sub.add_parser("train", help="train a ranking model: sample files, online, or MovieLens-100k",
                       description="'samples PATH...' trains on the pipeline's sample Parquet files "
                       "(histories from --sequences, a SequenceStore snapshot); 'online' runs the pipeline "
                       "in-process and trains on its samples as they are emitted, each batch scored before "
                       "it is trained on; 'movielens' trains next-item prediction on ml-100k (the recbole "
                       "wheel is fetched into ~/.cache/streamrec) and reports HR@10 / NDCG@10 of "
                       "leave-one-out full ranking.")
    t.add_argument("source", choices=["samples", "online", "movielens"])
    t.add_argument("paths", nargs="*", help="sample Parquet files or directories (for 'samples')")
    t.add_argument("--model", default="stca", choices=["stca", "sasrec", "din", "mean", "popularity"])
    t.add_argument("--model-dir", help="publish checkpoints here (CURRENT names the newest)")
    t.add_argument("--sequences", help="SequenceStore snapshot directory for histories ('samples')")
    t.add_argument("--pipeline", help="pipeline.toml ('online'; default: the generator, default features)")
    t.add_argument("--events", type=int, default=0, help="events the generator draws ('online'; 0: config)")
    t.add_argument("--epochs", type=int, default=1, help="epochs ('movielens', default 1)")
    t.add_argument("--negatives", type=int, default=16, help="sampled negatives per positive ('movielens')")
    t.add_argument("--history", type=int, default=10_000, help="newest history events read per request")
    t.add_argument("--min-len", type=int, default=0, help="sampled training history length, low end")
    t.add_argument("--max-len", type=int, default=0,
                   help="sampled training history length, high end (0: off)")
    t.add_argument("--dim", type=int, default=64, help="embedding and token width (default 64)")
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the dense weights")
    t.add_argument("--store-embeddings", action="store_true",
                   help="item and user rows in in-process store tables (Adagrad), in the checkpoints")
    t.add_argument("--publish-every", type=float, default=60.0,
                   help="seconds between checkpoints (0: at the end)")
    t.add_argument("--max-batches", type=int, default=None, help="stop after this many training steps")
    t.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--wheel", help="the recbole 1.2.1 wheel, if already downloaded ('movielens')")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    sv = sub.add_parser("serve", help="the ranking server (Open Inference Protocol v2, /rank, /metrics)",
                        description="Serve the model the trainer publishes into --model-dir (its CURRENT is "
                        "watched; new versions swap in between batches) over the Open Inference Protocol v2 "
                        "REST API (tritonclient.http works), POST /rank and Prometheus /metrics. Binds "
                        "127.0.0.1 unless told otherwise. [serve] fields of --config: see "
                        "streamrec.serving.ServeConfig.")
    sv.add_argument("--model-dir", required=True, help="the trainer's model directory")
    sv.add_argument("--config", help="TOML file with a [serve] table (ServeConfig fields)")
    sv.add_argument("--host", help="address to bind (default 127.0.0.1)")
    sv.add_argument("--port", type=int, help="port (default 8000)")
    sv.add_argument("--executor", choices=["auto", "eager", "compile"],
                    help="model execution (default eager)")
    sv.add_argument("--sequences", help="a SequenceStore snapshot to read user histories from")
    sv.add_argument("--counters", help="the feature set's counter snapshots (Stores.snapshot_counters)")
    sv.set_defaults(func=_serve)

    ps = sub.add_parser("ps", help="parameter server: serve a node, check a cluster spec, dump a replica",
                        description="'serve' runs one storage node of a cluster spec until SIGTERM/SIGINT; "
                        "'check FILE' validates a spec and prints each shard's replicas.")
    ps_sub = ps.add_subparsers(dest="what", metavar="WHAT", required=True)
    serve = ps_sub.add_parser("serve", help="run one storage node",
                              description="Run one storage node: TCP on the node's address, shared "
                              "memory for clients on this host, metrics and health on its metrics_port.")
    serve.add_argument("--config", required=True, help="cluster spec (TOML)")
    serve.add_argument("--node", required=True, help="this node's name in the spec")
    serve.add_argument("--workers", type=int, default=2, help="worker threads (default 2)")
    serve.add_argument("--no-shm", action="store_true", help="do not offer the shared-memory transport")
    serve.add_argument("--rdma", action="store_true", help="also offer UCX (needs the rdma extra)")
    serve.add_argument("--no-fill", action="store_true",
                       help="start replicas empty instead of filling them from a peer")
    serve.set_defaults(func=_ps)
    dump = ps_sub.add_parser("dump", help="read one node's replicas of a table directly",
                             description="Read every row of one node's replicas of a table over TCP, from "
                             "that node alone (no failover: to verify replicas one by one). Prints the rows "
                             "per shard; --out also writes shard, keys, values (with optimizer state) and "
                             "expires_at (0: never) to an .npz file. A replica still filling is refused.")
    dump.add_argument("--config", required=True, help="cluster spec (TOML)")
    dump.add_argument("--node", required=True, help="the node to read")
    dump.add_argument("--table", required=True, help="the table's name")
    dump.add_argument("--out", help="write the rows to this .npz file")
    dump.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    dump.set_defaults(func=_ps)
    status = ps_sub.add_parser("status", help="every replica's role, readiness, epoch, seq and lag",
                               description="Ask every node of the spec (HELLO over TCP) where each replica "
                               "stands: role (writable or serving), up, ready, epoch, applied seq, fan-out "
                               "parent, and a serving replica's lag behind its root (the writable replica "
                               "whose epoch it holds) in batches and seconds (the root's last commit time "
                               "minus that of the last batch applied). '-': unknown (down, or re-syncing).")
    status.add_argument("--config", required=True, help="cluster spec (TOML)")
    status.add_argument("--json", action="store_true", help="one JSON list of rows instead of a table")
    status.add_argument("--timeout", type=float, default=1.0, help="seconds per node (default 1)")
    status.set_defaults(func=_ps)
    pl = sub.add_parser("pipeline", help="the real-time sample pipeline",
                        description="'run' joins impressions with actions into labelled samples "
                        "(streamrec.pipeline.runner).")
    pl_sub = pl.add_subparsers(dest="what", metavar="WHAT", required=True)
    run = pl_sub.add_parser("run", help="run the embedded pipeline (one process)",
                            description="Read the sources, join impressions with actions in event-time "
                            "micro-batches (state in store tables), add features, write Parquet sample files "
                            "and checkpoints; a second run resumes from the last checkpoint, losing and "
                            "repeating nothing. pipeline.toml: top-level PipelineConfig fields, [join] "
                            "(JoinConfig) and [generator] (GeneratorConfig) tables.")
    run.add_argument("--config", required=True, help="pipeline.toml")
    run.add_argument("--restart", action="store_true", help="discard checkpoints and output, start over")
    run.add_argument("--max-batches", type=int, default=None, help="stop (with a checkpoint) after N batches")
    run.set_defaults(func=_pipeline)

    check = ps_sub.add_parser("check", help="validate a cluster spec",
                              description="Validate a cluster spec; errors name the line and field.")
    check.add_argument("file", help="cluster spec (TOML)")
    check.set_defaults(func=_ps)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if args.command == "config" and args.what == "check" and not args.file:
        parser.error("config check needs a FILE")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
