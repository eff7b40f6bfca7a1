"""Scale benchmark: the whole ``quadsel run`` on synthetic pools of N documents.

    python -m bench.scale_bench                       # N = 100k and 1M (the 1M run takes a while)
    python -m bench.scale_bench --n 20000 100000      # other sizes
    python -m bench.scale_bench --out bench/results_scale.md

Each size gets a synthetic pool of about 200 bytes a document: ``--domains`` "domains", each
with its own vocabulary of random words and its own sentence templates, so tf-idf + k-means
finds real structure. A reference set of 64 documents comes from one domain. The job runs
sources -> embed (tf-idf) -> cluster (k=1000) -> proxy model -> EK-FAC scorer -> Quad bandit ->
Arrow shards, in a fresh ``python -m jobs.cli run`` subprocess per size (Ray off: the data
plane in one process), with a small proxy model so that the bandit's scoring (a few thousand
rows whatever N is) does not dominate.

Measured per size: wall time of the subprocess, its peak RSS (``ru_maxrss`` from ``wait4``),
and the peak of anonymous memory (``RssAnon``, polled from ``/proc`` every 0.1 s: the heap,
excluding the memory-mapped pool and embedding files that the kernel can drop at will), and the
stage timings the run writes to ``timings.json``. The ratios between consecutive sizes are
printed: the goal is peak RSS at most 2x for 10x the data, and time about linear.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MACHINE = "2-core CPU container, shared with other jobs (noisy)"
TEMPLATES = [
    "{a} {b} the {c} of {d} when {e} {f} and {g}.",
    "why does {a} {b} {c}? because {d} {e} {f} {g} {h}.",
    "{a}: {b} {c} {d}, {e} {f}; {g} {h} {i}.",
    "in {a} we {b} {c} {d} to {e} the {f} {g}.",
]


def _word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9)))


def make_pool(path: Path, ref_path: Path, n: int, *, domains: int = 24, seed: int = 0) -> None:
    """Write ``n`` JSONL documents (~200 bytes each) of ``domains`` domains, and a reference."""
    rng = random.Random(seed)
    vocab = [[_word(rng) for _ in range(400)] for _ in range(domains)]
    common = [_word(rng) for _ in range(200)]
    tmpl = [[rng.choice(TEMPLATES) for _ in range(3)] for _ in range(domains)]

    def doc(d: int) -> str:
        parts = []
        while sum(len(p) for p in parts) < 170:
            words = [rng.choice(vocab[d]) if rng.random() < 0.8 else rng.choice(common)
                     for _ in range(9)]
            parts.append(rng.choice(tmpl[d]).format(*words, **dict(zip("abcdefghi", words))))
        return " ".join(parts)[:220]

    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            d = min(int(rng.paretovariate(1.2)) - 1, domains - 1)  # skewed domain sizes
            fh.write(json.dumps({"id": f"d{i}", "text": doc(d), "domain": f"dom{d:02d}"}) + "\n")
    with open(ref_path, "w", encoding="utf-8") as fh:
        for i in range(64):
            fh.write(json.dumps({"id": f"ref{i}", "text": doc(3)}) + "\n")


def job_config(data: Path, run_dir: Path, k: int) -> dict:
    return {
        "run_dir": str(run_dir),
        "seed": 0,
        "pool": {"path": str(data / "pool.jsonl")},
        "reference": {"path": str(data / "reference.jsonl")},
        "embed": {"kind": "tfidf", "dim": 64, "fit_sample": 20_000},
        "cluster": {"k": k, "niter": 10, "max_points_per_centroid": 64},
        "model": {"max_length": 48, "batch_size": 64,
                  "proxy": {"train_sample": 2000, "vocab_size": 1024, "hidden_size": 32,
                            "num_layers": 1, "num_heads": 2, "steps": 30, "batch_size": 16}},
        "scorer": {"name": "ekfac", "fit_sample": 128},
        "selection": {"method": "quad", "budget": {"unit": "examples", "fraction": 0.01},
                      "quad": {"probe_size": 2, "arms_per_round": 100}},
        "ray": {"enabled": False},
        "output": {"max_rows": 50_000},
    }


def _poll_anon(pid: int, peak: dict[str, int], stop: threading.Event) -> None:
    status = f"/proc/{pid}/status"
    while not stop.is_set():
        try:
            with open(status) as fh:
                for line in fh:
                    if line.startswith(("RssAnon:", "VmRSS:")):
                        key, val = line.split(":")
                        kb = int(val.split()[0])
                        peak[key] = max(peak.get(key, 0), kb)
        except (OSError, ValueError):
            return
        stop.wait(0.1)


def run_one(n: int, work: Path, k: int) -> dict:
    data = work / f"data-{n}"
    data.mkdir(parents=True, exist_ok=True)
    if not (data / "pool.jsonl").is_file():
        t = time.monotonic()
        make_pool(data / "pool.jsonl", data / "reference.jsonl", n)
        print(f"[{n:,}] generated pool ({(data / 'pool.jsonl').stat().st_size / 2**20:.0f} MiB) in "
              f"{time.monotonic() - t:.0f}s", flush=True)
    run_dir = work / f"run-{n}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: nothing cached
    cfg_path = work / f"job-{n}.yaml"
    cfg_path.write_text(yaml.safe_dump(job_config(data, run_dir, k)))
    cmd = [sys.executable, "-m", "quadsel", "run", str(cfg_path), "-q", "--progress", "quiet"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    log = open(work / f"log-{n}.txt", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    peak: dict[str, int] = {}
    stop = threading.Event()
    poller = threading.Thread(target=_poll_anon, args=(proc.pid, peak, stop), daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    poller.join()
    log.close()
    if proc.returncode != 0:
        raise SystemExit(f"run for N={n} failed ({proc.returncode}); see {work / f'log-{n}.txt'}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"n": n, "wall_s": round(wall, 1), "maxrss_mib": round(usage.ru_maxrss / 1024, 1),
            "anon_mib": round(peak.get("RssAnon", 0) / 1024, 1),
            "timings": summary["timings_s"], "selected": summary["selected"],
            "scorer_calls": summary["scorer_calls"], "rounds": summary["rounds"],
            "pool_bytes": (data / "pool.jsonl").stat().st_size}


def report(results: list[dict], k: int, out: Path | None) -> str:
    stages = ["sources", "embed", "cluster", "proxy", "fit_scorer", "select", "total"]
    lines = ["## Scale: the whole `quadsel run` at growing pool sizes", "",
             "Command: `python -m bench.scale_bench --n " + " ".join(str(r["n"]) for r in results) + "`  ",
             f"Machine: {MACHINE}; Python {platform.python_version()}.", "",
             f"Synthetic pool (~200 bytes/doc, 24 domains of templated random-word text), tf-idf dim 64, "
             f"k={k} clusters, proxy model (1 layer, hidden 32), EK-FAC scorer, Quad with probe_size 2 "
             "and 100 arms per round, budget 1% of the pool, Ray off. Fresh subprocess per size.", "",
             "| N | pool MiB | wall s | peak RSS MiB | peak anon MiB | scored rows | "
             + " | ".join(stages) + " |",
             "|---:|---:|---:|---:|---:|---:|" + "---:|" * len(stages)]
    for r in results:
        t = r["timings"]
        lines.append(f"| {r['n']:,} | {r['pool_bytes'] / 2**20:.0f} | {r['wall_s']} | {r['maxrss_mib']} | "
                     f"{r['anon_mib']} | {r['scorer_calls']:,} | "
                     + " | ".join(str(t.get(s, "")) for s in stages) + " |")
    lines.append("")
    for a, b in zip(results, results[1:]):
        f = b["n"] / a["n"]
        lines.append(f"- {a['n']:,} -> {b['n']:,} ({f:g}x data): peak RSS x{b['maxrss_mib'] / a['maxrss_mib']:.2f}, "
                     f"peak anon x{b['anon_mib'] / max(a['anon_mib'], 1e-9):.2f}, wall x{b['wall_s'] / a['wall_s']:.2f}, "
                     f"data-plane (sources+embed+cluster) x"
                     f"{sum(b['timings'].get(s, 0) for s in stages[:3]) / max(1e-9, sum(a['timings'].get(s, 0) for s in stages[:3])):.2f}")
    text = "\n".join(lines) + "\n"
    if out is not None:
        out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown fragment here")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="quadsel-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.n:
        r = run_one(n, work, args.k)
        print(json.dumps(r), flush=True)
        results.append(r)
    print(report(results, args.k, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
