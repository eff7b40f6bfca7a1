"""Feature-stage benchmark: pool examples per second on 1 and 2 Ray CPU actors, and on a GPU.

    python -m bench.feature_bench                      # CPU: tfidf and hidden (small proxy) on 1 vs 2 actors
    python -m bench.feature_bench --n 4000 --n-model 500   # a quick run
    python -m bench.feature_bench --device cuda        # + hidden / gradient with a ~125M model on the GPU

CPU part: the first ``--n`` documents of the bench pool are written as a pool store
(``--rows-per-shard`` rows per shard) and embedded by :func:`pipeline.feature_stage.compute_features`
on a local Ray instance, once with 1 actor and once with 2 actors (1 CPU, 1 torch thread each),
in this one process; each run writes into a fresh folder, so nothing is resumed. Embedders:
``tfidf`` (fitted once beforehand, the fit is not timed) and ``hidden`` with a small randomly
initialised Llama built from a config (``--cpu-hidden`` wide, 2 layers) — a compute-bound model
workload. The wall time includes starting the actors (loading the embedder in each), which is
what a user waits for; the 1- and 2-actor runs are checked to give byte-identical shards.

GPU part (``--device cuda``): a ~125M-parameter Llama (hidden 768, 12 layers, 12 heads, MLP 3072,
byte-level BPE vocabulary 8192 trained on the pool sample; random weights: the speed does not
depend on them) saved to a temporary folder; ``hidden`` (last layer) and ``gradient``
(``--projection-dim``, all attention and MLP matrices) embedders run in-process on the GPU
(bf16 weights) with ``--model-batch`` texts per pass and ``--max-length`` tokens.
``--device cpu --gpu-model tiny`` runs the same code on the CPU with a tiny model (a smoke test).

Results go to ``--out`` (default bench/results_features.md).
"""
from __future__ import annotations

import argparse
import filecmp
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POOL = REPO.parent / "shared" / "data" / "bench" / "pool.jsonl"
MACHINE = "2-core CPU container, shared with other jobs (noisy)"


def load_pool(n: int, root: Path, rows_per_shard: int):
    """The first ``n`` documents of the bench pool as a pool store under ``root``."""
    from quadsel.pipeline.sources import Example
    from quadsel.pipeline.store import PoolStore

    rows = []
    with open(POOL, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i >= n:
                break
            d = json.loads(line)  # `domain` is not read: measurement only, and not needed here
            rows.append(Example(id=str(d["id"]), text=d["text"], meta={}, source="pool.jsonl", line=i + 1))
    return PoolStore.write([rows], root / "pool", rows_per_shard=rows_per_shard)


def save_model(root: Path, texts: list[str], *, size: str, cpu_hidden: int, max_length: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from quadsel.influence.proxy import train_tokenizer

    vocab, hidden, layers, heads, mlp = {
        "125m": (8192, 768, 12, 12, 3072),
        "small": (4096, cpu_hidden, 2, 4, 4 * cpu_hidden),
        "tiny": (512, 32, 2, 4, 64),
    }[size]
    tok = train_tokenizer(texts[:3000], vocab, max_length)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_length,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    path = root / f"model-{size}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    (path / "bench.json").write_text(json.dumps({"params": n_params}))
    return path


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def cpu_part(pool, root: Path, args, lines: list[str]) -> None:
    import ray

    from quadsel.pipeline.embed import EmbedConfig
    from quadsel.pipeline.feature_stage import compute_features, prepare_embedder

    model = save_model(root, pool.texts(range(min(len(pool), 3000))), size="small",
                       cpu_hidden=args.cpu_hidden, max_length=args.max_length)
    model_pool = load_pool(min(args.n_model, len(pool)), root / "model-pool", args.rows_per_shard)
    cases = {
        "tfidf": EmbedConfig(dim=256, batch_size=args.batch_size),
        f"hidden (Llama {args.cpu_hidden}x2, CPU)": EmbedConfig(
            kind="hidden", model=str(model), device="cpu", dtype="float32", max_length=args.max_length,
            model_batch_size=args.model_batch, batch_size=args.batch_size),
    }
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # our own instance
    lines += ["| embedder | rows | actors | wall (s) | start-up (s) | end-to-end ex/s | steady ex/s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    summary = []
    try:
        for name, cfg in cases.items():
            sub = pool if cfg.kind == "tfidf" else model_pool
            emb_dir = prepare_embedder(sub, cfg, root / f"emb-{cfg.kind}")
            st, outs = {}, {}
            for actors in (1, 2):
                out = root / f"feat-{cfg.kind}-{actors}"
                st[actors] = {}
                compute_features(sub, emb_dir, out, backend="ray", num_actors=actors, batch_size=cfg.batch_size,
                                 stats=st[actors])
                outs[actors] = out
                s = st[actors]
                print(f"{name}: {actors} actor(s) {s['seconds']:.1f}s, steady {s['steady_rows_per_s']:,.0f} ex/s",
                      flush=True)
                lines.append(f"| {name} | {len(sub):,} | {actors} | {s['seconds']:.1f} | {s['first_result_s']:.1f} | "
                             f"{len(sub) / s['seconds']:,.0f} | {s['steady_rows_per_s']:,.0f} |")
            same = all(filecmp.cmp(outs[1] / f.name, outs[2] / f.name, shallow=False)
                       for f in outs[1].iterdir() if f.is_file())
            summary.append(f"- {name}: scaling 2 actors / 1 actor = **{st[2]['steady_rows_per_s'] / st[1]['steady_rows_per_s']:.2f}x** "
                           f"steady, {st[1]['seconds'] / st[2]['seconds']:.2f}x end-to-end; shards of the two runs "
                           f"byte-identical: {'yes' if same else 'NO'}")
    finally:
        ray.shutdown()
    lines += [""] + summary


def gpu_part(pool, root: Path, args, lines: list[str]) -> None:
    import torch

    from quadsel.pipeline.embed import EmbedConfig
    from quadsel.pipeline.feature_stage import compute_features, prepare_embedder

    model = save_model(root, pool.texts(range(min(len(pool), 3000))), size=args.gpu_model,
                       cpu_hidden=args.cpu_hidden, max_length=args.max_length)
    params = json.loads((model / "bench.json").read_text())["params"]
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    lines += ["", f"### {args.device} ({dev}): Llama {params / 1e6:.0f}M params, {args.max_length} tokens, "
                  f"{args.model_batch} texts per pass, in-process", "",
              "| embedder | dim | wall (s) | ex/s |", "|---|---:|---:|---:|"]
    for kind in ("hidden", "gradient"):
        cfg = EmbedConfig(kind=kind, model=str(model), device=args.device, max_length=args.max_length,
                          model_batch_size=args.model_batch, batch_size=args.batch_size,
                          projection_dim=args.projection_dim)
        emb_dir = prepare_embedder(pool, cfg, root / f"emb-gpu-{kind}")
        store, wall = timed(lambda: compute_features(pool, emb_dir, root / f"feat-gpu-{kind}", batch_size=cfg.batch_size))
        print(f"{kind} on {args.device}: {wall:.1f}s, {len(pool) / wall:,.1f} ex/s", flush=True)
        lines.append(f"| {kind} | {store.dim} | {wall:.1f} | {len(pool) / wall:,.1f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="pool documents (the first n of the bench pool)")
    ap.add_argument("--n-model", type=int, default=2000, help="documents for the CPU model embedder")
    ap.add_argument("--rows-per-shard", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=256, help="rows per work chunk")
    ap.add_argument("--model-batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--cpu-hidden", type=int, default=128, help="width of the small CPU model")
    ap.add_argument("--device", default="cpu", help="cpu (CPU part only) or cuda (also the GPU part)")
    ap.add_argument("--gpu-model", choices=["125m", "tiny"], default="125m")
    ap.add_argument("--projection-dim", type=int, default=8192)
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results_features.md")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    import ray

    cmd = "python -m bench.feature_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["## Feature stage (pipeline.feature_stage)", "", f"Command: `{cmd.strip()}`  ",
             f"Machine: {MACHINE}; Python {platform.python_version()}, ray {ray.__version__}.", ""]
    with tempfile.TemporaryDirectory(prefix="feature-bench-") as tmp:
        root = Path(tmp)
        pool = load_pool(args.n, root, args.rows_per_shard)
        lines += [f"Pool: the first {len(pool):,} documents of the bench pool ({args.n_model:,} for the model "
                  f"embedder), shards of {args.rows_per_shard} rows, chunks of {args.batch_size} rows; Ray "
                  "actors with 1 CPU and 1 torch thread each. Wall = the whole compute_features call "
                  "(Ray Data planning, actor start-up incl. loading the embedder, embedding, writing "
                  "shards); start-up = until the first chunk is back; steady = rows after the first "
                  "chunk per second.", ""]
        if not args.skip_cpu:
            lines += ["### Ray CPU actors: 1 vs 2 (one run)", ""]
            cpu_part(pool, root, args, lines)
        if args.device != "cpu" or args.gpu_model == "tiny":
            gpu_part(pool, root, args, lines)
        else:
            lines += ["", "GPU part (`--device cuda`: hidden and gradient embedders with a ~125M model): "
                          "**not run** — no GPU in this session."]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
