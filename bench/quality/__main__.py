"""``python -m bench.quality --target gsm8k`` (see :mod:`bench.quality`)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import DEFAULT_CACHE, DEFAULT_DATA, METHODS, PRESETS, REPO, make_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    ap.add_argument("--target", default="gsm8k",
                    help="a target name under DATA/targets, its leave-domain-out variant NAME-ood (the pool "
                         "without the target's domain), comma-separated names, or 'all' (every target and -ood)")
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (0..n-1)")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--budget-fraction", type=float, default=None, help="share of the pool's tokens (default 0.1)")
    ap.add_argument("--steps", type=int, default=None, help="training steps of the evaluated LM")
    ap.add_argument("--scorer-option", action="append", default=[], metavar="NAME.KEY=VALUE",
                    help="an option of one scorer, e.g. el2n.prefer=low (repeatable; value parsed as YAML)")
    ap.add_argument("--device", default=None, help="cpu (default) or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA))
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    ap.add_argument("--out", default=str(REPO / "bench" / "results_quality.md"),
                    help="markdown report ('-' to skip writing it)")
    ap.add_argument("--quiet-progress", action="store_true", help="progress as periodic log lines")
    ap.add_argument("--report-only", action="store_true", help="re-render the report from saved summaries")
    args = ap.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from quadsel.core.progress import configure_logging

    configure_logging("INFO", progress="log" if args.quiet_progress else "auto")
    from . import markdown
    from .report import console_table
    from .runner import load_summaries, run

    data_dir = Path(args.data_dir)
    probe = make_config(args.preset, data_dir=str(data_dir))
    targets = probe.all_variants() if args.target == "all" else [t.strip() for t in args.target.split(",") if t.strip()]
    if not targets:
        ap.error(f"no targets under {data_dir / 'targets'}")
    over: dict = {"data_dir": str(data_dir), "cache_dir": args.cache_dir, "targets": targets,
                  "device": args.device, "threads": args.threads, "budget_fraction": args.budget_fraction}
    if args.seeds is not None:
        over["seeds"] = list(range(args.seeds))
    if args.methods:
        over["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.scorer_option:
        import yaml

        options: dict = {}
        for item in args.scorer_option:
            key, sep, raw = item.partition("=")
            name, dot, opt = key.strip().partition(".")
            if not (sep and dot and name and opt):
                ap.error(f"--scorer-option expects NAME.KEY=VALUE, got {item!r}")
            options.setdefault(name, {})[opt] = yaml.safe_load(raw)
        over["scorer"] = {"options": options}
    if args.steps is not None:
        over["lm"] = {"steps": args.steps}
    try:
        cfg = make_config(args.preset, **over)
    except ValueError as e:
        ap.error(str(e))
    if args.report_only:
        summaries = {t: s for t, s in load_summaries(cfg).items() if t in targets and "evaluators" in s}
        if not summaries:
            print("no saved results for this configuration; run without --report-only first", file=sys.stderr)
            return 1
    else:
        summaries = run(cfg)
    print(console_table(summaries))
    if args.out != "-":
        every = load_summaries(cfg)  # targets run earlier with the same settings too
        every.update(summaries)
        path = markdown.write(Path(args.out), cfg, every, argv if argv is not None else sys.argv[1:])
        print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
