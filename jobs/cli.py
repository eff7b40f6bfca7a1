"""The ``quadsel`` command line."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from quadsel import __version__
from quadsel.core.progress import configure_logging

logger = logging.getLogger(__name__)

_EPILOG = """examples:
  quadsel demo                               build the embedded corpus and run the main job on it
  quadsel run job.yaml                       select; resumes if interrupted
  quadsel run job.yaml --address auto        on an existing Ray cluster
  quadsel cluster job.yaml --set cluster.k=500
  quadsel inspect runs/my-run --top 30
  quadsel inspect runs/my-run --cluster 12
  quadsel report runs/my-run                 a self-contained runs/my-run/report.html
  quadsel verify runs/my-run                 the shards against the manifest (sizes, rows, sha256)
  quadsel pack runs/my-run --tokenizer PATH --seq-len 2048   token ids for pre-tokenized trainers
  quadsel config --defaults > job.yaml       a full config with every default
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    g.add_argument("--log-json", action="store_true", help="JSON log lines (for clusters / collectors)")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    g.add_argument("--progress", default="auto", choices=["auto", "pretty", "log", "quiet"],
                   help="progress bars (pretty), periodic log lines (log) or none; auto picks by terminal")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="job config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set cluster.k=500 (repeatable)")
    p.add_argument("--run-dir", help="shortcut for --set run_dir=DIR")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quadsel", description="Select language-model training data that is influential and diverse (Quad).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"quadsel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="build the embedded default corpus and run the main job on it",
                       description="Build a corpus from the Python standard library (code, docstrings, "
                                   "language reference) plus spam, garbage and duplicates, then run on it.")
    p.add_argument("--run-dir", default="demo-run", help="where the corpus and the run go (default: demo-run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_common(p)

    p = sub.add_parser("run", help="the whole selection job: pool -> Arrow shards of the selection",
                       description="sources -> embed -> cluster -> fit scorer -> bandit -> shards. Finished "
                                   "stages are cached; a killed run resumes from its last bandit round.")
    _add_config(p)
    p.add_argument("--address", help="join an existing Ray cluster first (HOST:PORT, auto, ray://HOST:PORT; "
                                     "local = a fresh local instance); default: $RAY_ADDRESS when set "
                                     "(ray job submit sets it), else start Ray locally")
    p.add_argument("--no-ray", action="store_true", help="score in-process instead of on Ray actors")
    _add_common(p)

    p = sub.add_parser("cluster", help="read, validate, embed and cluster a pool",
                       description="sources -> embed -> cluster; writes clusters/assignments.parquet and "
                                   "clusters/summary.parquet into the run directory.")
    _add_config(p)
    _add_common(p)

    p = sub.add_parser("inspect", help="show a run's clusters, or one cluster's members",
                       description="A table of clusters (size, neighbours, snippets nearest each centroid, "
                                   "and bandit statistics for selection runs).")
    p.add_argument("run_dir", help="a run directory")
    p.add_argument("--cluster", type=int, help="list this cluster's members with their scores")
    p.add_argument("--top", type=int, default=20, help="rows to show (default 20)")
    _add_common(p)

    p = sub.add_parser("report", help="write a self-contained HTML report of a run",
                       description="One HTML file (inline figures, no external resources): pool vs. selection "
                                   "per cluster, score distributions, the bandit trajectory, a centroid map, "
                                   "budget progress, rejects, domain mix, config and timings.")
    p.add_argument("run_dir", help="a run directory")
    p.add_argument("--out", help="where to write it (default: RUN_DIR/report.html)")
    _add_common(p)

    p = sub.add_parser("verify", help="check a finished selection: shards against the manifest, cluster tables",
                       description="Every shard listed in RUN_DIR/manifest.json exists with its recorded size, "
                                   "rows and sha256, and clusters/summary.parquet describes the shards' clusters. "
                                   "Reads only; exit 2 with the first problem found.")
    p.add_argument("run_dir", help="a run directory")
    _add_common(p)

    from quadsel.pipeline import pack

    p = sub.add_parser("pack", help="tokenize a finished selection into fixed-length sequences",
                       description=pack.DESCRIPTION)
    pack.add_arguments(p)
    _add_common(p)

    p = sub.add_parser("config", help="print or check a config",
                       description="Print a complete job config, or check one (--check) without running it.")
    p.add_argument("--defaults", action="store_true", help="every field with its default (pool.path to fill in)")
    p.add_argument("--check", action="store_true",
                   help="run every up-front check of `quadsel run` (paths, model, device, scorer, the pool's "
                        "valid rows against k and the budget) and list all problems; runs and writes nothing")
    p.add_argument("config", nargs="?", help="a config to validate and print resolved")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_common(p)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """What the CLI answers with one line and exit 2: every QuadselError (quadsel.core.errors),
    OSError (disk full, unreadable files, lost mounts) and a truncated weights file."""
    from quadsel.core.errors import QuadselError

    extra: tuple[type[BaseException], ...] = ()
    try:  # a truncated weights file (model folder or saved scorer): not an OSError
        from safetensors import SafetensorError

        extra = (SafetensorError,)
    except ImportError:  # pragma: no cover
        pass
    return (QuadselError, OSError, *extra)


def _load(args):
    from .config import load_config

    overrides = list(args.overrides)
    if getattr(args, "run_dir", None):
        overrides.append(f"run_dir={args.run_dir}")
    return load_config(args.config, overrides)


def _run_and_show(args, job, before=None) -> int:
    """Run ``job(cfg)``, show the clusters (unless quiet) and print the summary as JSON."""
    from .inspect import inspect_clusters

    cfg = _load(args)
    if before is not None:
        before(cfg)
    summary = job(cfg)
    if not args.quiet:
        inspect_clusters(cfg.run_dir, top=15)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_cluster(args) -> int:
    from .cluster_job import run_cluster

    return _run_and_show(args, run_cluster)


def cmd_run(args) -> int:
    from .run_job import run_selection

    if args.address:
        args.overrides.append(f"ray.address={args.address}")
    if args.no_ray:
        args.overrides.append("ray.enabled=false")
        if not args.address:  # --no-ray wins over an address in the file; with --address: an error
            args.overrides.append("ray.address=null")
    was_connected = _ray_connected()  # by the caller (in-process use): theirs to keep
    try:
        return _run_and_show(args, run_selection, before=_connect_ray)
    finally:
        if not was_connected and _ray_connected():
            _shutdown_ray()


def _ray_connected() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _shutdown_ray() -> None:
    """Leave Ray as this command found it: disconnect from a cluster it joined, and stop a local
    instance it started with every process of it (by pid; see ray_runtime.shutdown)."""
    from quadsel.pipeline.ray_runtime import shutdown

    shutdown()


def _connect_ray(cfg) -> None:
    """Join the Ray cluster first, before any work: a wrong ``--address`` (or ``ray.address``,
    or ``$RAY_ADDRESS`` inside ``ray job submit``) fails in seconds, not after the embedding.
    No address: nothing here, the run starts a local instance when it needs one."""
    from quadsel.pipeline.ray_runtime import LOCAL, actor_fit_problem, connect, resolve_address

    from .config import ConfigError

    if not cfg.ray.enabled or resolve_address(cfg.ray.address) == LOCAL:
        return
    connect(cfg.ray.address)
    if cfg.selection.method != "random" or cfg.embed.backend == "ray":  # the job starts actors
        why = actor_fit_problem(cfg.ray.num_cpus_per_actor)
        if why:
            raise ConfigError(f"ray.num_cpus_per_actor = {cfg.ray.num_cpus_per_actor:g} but {why}: no actor "
                              "could ever be placed; lower ray.num_cpus_per_actor or add larger nodes")


def cmd_demo(args) -> int:
    from .demo_job import run_demo

    run_demo(Path(args.run_dir), seed=args.seed, overrides=args.overrides, quiet=args.quiet)
    return 0


def cmd_inspect(args) -> int:
    from .inspect import inspect_cluster, inspect_clusters

    if args.cluster is not None:
        inspect_cluster(args.run_dir, args.cluster, top=args.top)
    else:
        inspect_clusters(args.run_dir, top=args.top)
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    print(write_report(args.run_dir, args.out))
    return 0


def cmd_verify(args) -> int:
    from quadsel.pipeline.shards import read_manifest, verify

    from .inspect import InspectError, selection_tables_problem

    verify(args.run_dir)
    why = selection_tables_problem(args.run_dir)
    if why:
        raise InspectError(why)
    m = read_manifest(args.run_dir)
    print(json.dumps({"ok": True, "run_dir": str(args.run_dir), "format": m["format"], "shards": len(m["shards"]),
                      "rows": m["total_rows"]}, indent=2))
    return 0


def cmd_config(args) -> int:
    from .config import ConfigError, dump_config, load_config

    if args.check:
        from .preflight import check_job

        if not args.config:
            raise ConfigError("config --check needs a config file")
        cfg = load_config(args.config, args.overrides)
        found = check_job(cfg, "run")
        print(json.dumps({"ok": True, **found}, indent=2))
        return 0
    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        cfg = load_config(None, args.overrides, base={"pool": {"path": "path/to/pool.jsonl"}})
    sys.stdout.write(dump_config(cfg))
    if args.defaults:
        from .config import open_sections_reference

        sys.stdout.write(open_sections_reference())
    return 0


def cmd_pack(args) -> int:
    from quadsel.pipeline import pack

    print(json.dumps(pack.run(args), indent=2))
    return 0


COMMANDS = {"run": cmd_run, "demo": cmd_demo, "cluster": cmd_cluster, "inspect": cmd_inspect, "report": cmd_report,
            "verify": cmd_verify, "pack": cmd_pack, "config": cmd_config}


def _quiet_third_party() -> None:
    """Our own progress reporting replaces the libraries' bars and chatter."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


class Stopped(KeyboardInterrupt):
    """SIGTERM (or SIGINT) arrived: unwind (every ``finally`` runs: locks, Ray), then exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopOnSignal:
    """Within: SIGTERM and SIGINT raise :class:`Stopped` in the main thread, once; the next
    signal while the command is stopping is noted and ignored, so the cleanup (shutting Ray
    down, releasing the run lock) finishes; one more after that ends the process at once (the
    default action: for a cleanup that hangs). The previous handlers come back after."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.stopping = False
        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.stopping:
            logger.warning("%s: already stopping (shutting down cleanly); send it once more to end at once",
                           signal.Signals(signum).name)
            for sig in self.SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            return
        self.stopping = True
        raise Stopped(signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, json_lines=args.log_json, quiet=args.quiet, progress=args.progress)
    _quiet_third_party()
    with _StopOnSignal() as stop:
        try:
            return COMMANDS[args.command](args)
        except _user_errors() as e:
            print(f"quadsel {args.command}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            stop.stopping = True
            signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
            why = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted"
            print(f"quadsel {args.command}: {why}; rerun the same command to resume", file=sys.stderr)
            return 128 + int(signum)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
