"""Influence feature benchmark: quadsel's factored projections vs a naive LESS-style baseline.

    python -m bench.influence_bench                       # CPU: tiny-dense model, all three paths
    python -m bench.influence_bench --model-size small    # CPU: a bigger model, (b) vs (c) only
    python -m bench.influence_bench --model-size 125m --device cuda --dtype bf16   # GPU (T=1024)

Same model, same texts, one run:

(a) naive LESS-style: a per-example loop (batch of 1), the full gradient of the tracked weights
    (``loss.backward()``, flattened), a DENSE Gaussian projection matrix ``[D_total, dim]``
    applied to the stacked gradients every 16 examples (LESS's ``collect_grads`` does this). The
    matrix is materialised once, so the model must be small enough for it to fit in memory
    (``--naive-max-gb``); otherwise (a) is skipped and said so.
(b) quadsel: ``FeatureExtractor(projection_dim=dim)`` — x projected in forward hooks, δ in
    backward hooks, no weight gradients.
(c) a plain forward + backward of the batch (``loss.backward()`` with weight gradients).

Plus (d) the Quad fast path: ``ekfac`` scorer scoring with a collapsed reference (exact, and
rank 32), which needs no features at all.

Then (issue 17) the "scoring at the floor" section(s), see ``FLOOR_DOC`` below.

Tokens/s counts real (non-padding) tokens. (b), (c), (d) are timed in interleaved rounds; each
timing is the best of ``--repeats`` rounds after a warm-up (wall and process CPU time). Results go to ``--out`` (default bench/results_influence.md).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
POOL = REPO.parent / "shared" / "data" / "bench" / "pool.jsonl"
MACHINE = "2-core CPU container, shared with other jobs (noisy)"

SIZES = {
    # tracked (attention + MLP) params ~131k: the dense [D, 8192] fp32 matrix is ~4.3 GB
    "tiny-dense": dict(arch="llama", hidden=64, layers=2, heads=4, inter=256, vocab=4096, seq=256, batch=8),
    # ~4.2M tracked params: the dense matrix would need ~137 GB, so (a) is skipped
    "small": dict(arch="llama", hidden=256, layers=4, heads=4, inter=1024, vocab=8192, seq=256, batch=8),
    # GPT-2 small shape (~124M params, Conv1D layers), T=1024: for a GPU
    # issue 17 ("scoring at the floor"): the widths where the hooks' own work used to show
    "d256": dict(arch="llama", hidden=256, layers=4, heads=4, inter=1024, vocab=8192, seq=256, batch=4),
    "d512": dict(arch="llama", hidden=512, layers=8, heads=8, inter=2048, vocab=8192, seq=512, batch=2),
    "125m": dict(arch="gpt2", hidden=768, layers=12, heads=12, inter=3072, vocab=50304, seq=1024, batch=8),
}


def build_model(cfg: dict, dtype: torch.dtype, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if cfg["arch"] == "gpt2":
        c = GPT2Config(vocab_size=cfg["vocab"], n_embd=cfg["hidden"], n_layer=cfg["layers"], n_head=cfg["heads"],
                       n_positions=cfg["seq"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(c)
    else:
        c = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["inter"],
                        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                        num_key_value_heads=cfg["heads"], max_position_embeddings=cfg["seq"],
                        tie_word_embeddings=False)
        model = LlamaForCausalLM(c)
    return model.to(dtype).eval()


def pool_docs(seed: int) -> tuple[list[str], str]:
    """The bench pool's documents (or synthetic ones where it is absent) and where they came from."""
    if POOL.is_file():
        return [json.loads(line)["text"] for line in POOL.open(encoding="utf-8")], f"bench pool ({POOL.name})"
    from quadsel.influence.testing import random_texts

    return (random_texts(20000, seed=seed, min_words=20, max_words=200),
            "synthetic random words (bench pool not found)")


def load_texts(n: int, min_chars: int, seed: int) -> tuple[list[str], str]:
    """Pool documents joined until each text has >= min_chars characters (full-length rows)."""
    rng = np.random.default_rng(seed)
    docs, src = pool_docs(seed)
    order = rng.permutation(len(docs))
    out, cur, k = [], [], 0
    while len(out) < n:
        cur.append(docs[order[k % len(order)]])
        k += 1
        if sum(map(len, cur)) >= min_chars:
            out.append("\n\n".join(cur))
            cur = []
    return out, src


def best_of(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` runs; the best process CPU time is kept in ``best_of.last_cpu`` (on a
    shared machine CPU time is less disturbed by other jobs than wall time)."""
    best, best_cpu = math.inf, math.inf
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    best_of.last_cpu = best_cpu
    return best


def interleaved_best(fns: dict, repeats: int, on_round=None) -> dict[str, list[float]]:
    """``{key: [best wall, best CPU]}`` of each function: one warm-up call each (allocator,
    projection matrices, first-call costs), then ``repeats`` rounds calling every function once
    in turn, so that the machine's load falls on all of them alike. ``on_round(r, best)`` after
    each round."""
    for fn in fns.values():
        fn()
    best = {key: [math.inf, math.inf] for key in fns}
    for r in range(repeats):
        for key, fn in fns.items():
            wall = best_of(fn, 1)
            best[key] = [min(best[key][0], wall), min(best[key][1], best_of.last_cpu)]
        if on_round is not None:
            on_round(r, best)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-size", choices=sorted(SIZES), default="tiny-dense")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    ap.add_argument("--dtype", default=None, help="fp32 / bf16 (default: fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the size's)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--n-docs", type=int, default=64, help="rows for (b), (c), (d)")
    ap.add_argument("--naive-docs", type=int, default=32, help="rows for the per-example loop (a)")
    ap.add_argument("--dim", type=int, default=8192, help="output feature dimension")
    ap.add_argument("--naive-max-gb", type=float, default=6.0, help="largest dense matrix to materialise")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-scorer", action="store_true", help="skip (d)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results_influence.md"))
    ap.add_argument("--accuracy", action="store_true",
                    help="instead: accuracy of projected / low-rank scores vs exact on a trained proxy model")
    ap.add_argument("--proxy-dir", default=None, help="--accuracy: reuse (or write) the proxy model here")
    ap.add_argument("--floor", nargs="*", default=["d256:256"], metavar="SIZE:T",
                    help="issue 17 section(s), e.g. d256:256 d256:512 d512:512; none: skip it")
    ap.add_argument("--only-floor", action="store_true", help="run only the --floor section(s)")
    ap.add_argument("--floor-docs", type=int, default=8, help="--floor: candidate texts")
    ap.add_argument("--floor-fit-docs", type=int, default=8, help="--floor: curvature fit texts")
    ap.add_argument("--floor-ref-docs", type=int, default=4, help="--floor: reference texts")
    ap.add_argument("--floor-repeats", type=int, default=3)
    ap.add_argument("--floor-marginal", type=int, default=3,
                    help="--floor: also time fit and scoring with this many times the texts (<= 1: not)")
    ap.add_argument("--floor-round-docs", type=int, default=64, help="--floor: pool documents of one round")
    ap.add_argument("--floor-round-batch", type=int, default=None,
                    help="--floor: the round's chunk size (default: the model's batch size, as in a job)")
    ap.add_argument("--skip-kronfluence", action="store_true", help="--floor: without the kronfluence comparison")
    ap.add_argument("--skip-memory", action="store_true", help="--floor: without the peak-memory subprocesses")
    ap.add_argument("--profile", action="store_true", help="--floor: print torch.profiler tables first")
    ap.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.accuracy:
        return accuracy(args)
    if args.mem_child:
        sys.path.insert(0, str(REPO))
        return mem_child(args)
    if args.only_floor:
        for spec in args.floor:
            floor_bench(args, spec)
        return 0

    sys.path.insert(0, str(REPO))
    from quadsel.influence import FeatureExtractor, InfluenceModel, make_scorer
    from quadsel.influence.model import resolve_device, resolve_dtype
    from quadsel.influence.proxy import train_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dict(SIZES[args.model_size])
    if args.seq_len:
        cfg["seq"] = args.seq_len
    if args.batch_size:
        cfg["batch"] = args.batch_size
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    T, B = cfg["seq"], cfg["batch"]

    n_total = max(args.n_docs, args.naive_docs)
    texts, src = load_texts(n_total + 16, min_chars=8 * T, seed=args.seed)
    tok = train_tokenizer(texts[:400], min(cfg["vocab"], 4096), T)
    model = build_model(cfg, dtype, args.seed)
    im = InfluenceModel(model, tok, max_length=T, batch_size=B, device=device)
    fe = FeatureExtractor(im, layers="all", projection_dim=args.dim, seed=args.seed)
    d_total = sum(t.numel for t in fe.layers)
    n_params = sum(p.numel() for p in model.parameters())
    ids = im.tokenize(texts[:n_total])
    batches = list(im.batches_from_ids(ids[:args.n_docs], B))
    n_tok = int(sum(int(b.attention_mask.sum()) for b in batches))
    print(f"model {args.model_size}: {n_params / 1e6:.2f}M params, tracked D_total={d_total:,} in "
          f"{len(fe.layers)} layers; feature dim {fe.layout.dim}; T={T}, batch {B}, {device}, {dtype}",
          flush=True)

    # (b) quadsel features, (c) plain forward + backward, (d) the Quad fast path: timed in
    # interleaved rounds (b, c, d, b, c, d, ...) so that all see the same machine load
    def features():
        fe.compute_batches(batches, args.n_docs)

    def plain():
        for b in batches:
            model.zero_grad(set_to_none=True)
            loss = im.summed_loss(im.logits(b), b.input_ids, b.attention_mask).sum()
            loss.backward()
        model.zero_grad(set_to_none=True)

    for p in model.parameters():
        p.requires_grad_(True)
    from quadsel.influence.hooks import GradientPass

    def floor():  # (b) without its hooks: forward + activation-only backward (the lower bound)
        with GradientPass(im, [], [], lambda *a: None) as gp:
            for b in batches:
                gp.run(b)

    timed = {"b": features, "b0": floor, "c": plain}
    if not args.skip_scorer:
        fit_texts, ref_texts = texts[n_total:n_total + 12], texts[n_total + 12:n_total + 16]
        cand_texts = texts[:args.n_docs]
        for label, kw in (("exact", {}), ("rank 32", {"rank": 32})):
            sc = make_scorer("ekfac", im, damping=0.1, **kw)
            sc.fit(fit_texts).set_reference(ref_texts)
            timed[f"d {label}"] = (lambda sc=sc: sc.score(cand_texts))
    best = interleaved_best(timed, args.repeats)
    results: dict[str, dict] = {}
    for key, (wall, cpu) in best.items():
        results[key] = {"seconds": wall, "tokens": n_tok, "cpu": cpu}
        print(f"({key}): {wall:.3f}s wall, {n_tok / wall:,.0f} tok/s; {cpu:.3f}s CPU", flush=True)

    # (a) naive LESS-style ---------------------------------------------------------------------
    mat_gb = d_total * args.dim * 4 / 1e9
    if mat_gb > args.naive_max_gb:
        results["a1"] = {"skipped": f"the dense [{d_total:,} x {args.dim}] fp32 matrix needs {mat_gb:.1f} GB "
                                   f"(> --naive-max-gb {args.naive_max_gb})"}
        print(f"(a) skipped: {results['a1']['skipped']}", flush=True)
    else:
        from quadsel.influence.layers import get_modules

        gen = torch.Generator(device="cpu").manual_seed(args.seed)
        proj = (torch.randn(d_total, args.dim, generator=gen) / math.sqrt(args.dim)).to(device)
        mods = get_modules(model, fe.layers)
        naive_ids = ids[:args.naive_docs]
        naive_tok = int(sum(len(x) for x in naive_ids))
        grads: list[torch.Tensor] = []

        def naive_grads():  # the per-example loop: batch of 1, full weight gradients, flattened
            grads.clear()
            for seq in naive_ids:
                x = torch.tensor([seq], device=device)
                m = torch.ones_like(x)
                model.zero_grad(set_to_none=True)
                loss = im.summed_loss(model(input_ids=x, attention_mask=m).logits, x, m).sum()
                loss.backward()
                grads.append(torch.cat([mod.weight.grad.reshape(-1).float() for mod in mods]))
            model.zero_grad(set_to_none=True)

        def naive_project(chunk: int):
            out = np.zeros((len(grads), args.dim), dtype=np.float32)
            for s0 in range(0, len(grads), chunk):
                out[s0:s0 + chunk] = (torch.stack(grads[s0:s0 + chunk]) @ proj).cpu().numpy()
            return out

        t_grad = best_of(naive_grads, 1)
        c_grad = best_of.last_cpu
        for chunk in (1, 16):
            t_p = best_of(lambda: naive_project(chunk), 1)
            key = f"a{chunk}"
            results[key] = {"seconds": t_grad + t_p, "tokens": naive_tok, "matrix_gb": mat_gb,
                            "cpu": c_grad + best_of.last_cpu,
                            "grad_seconds": t_grad, "project_seconds": t_p}
            print(f"(a) naive LESS-style, projecting {chunk} rows at a time: {t_grad:.2f}s gradients + "
                  f"{t_p:.2f}s projection for {len(naive_ids)} rows, {naive_tok / (t_grad + t_p):,.0f} tok/s",
                  flush=True)
        del proj

    write_report(args, cfg, results, dict(n_params=n_params, d_total=d_total, layers=len(fe.layers),
                                          feat_dim=fe.layout.dim, device=str(device), dtype=str(dtype),
                                          src=src, n_tok=n_tok))
    if device.type == "cpu":
        n_threads = torch.get_num_threads()
        for spec in args.floor:
            floor_bench(args, spec)
        torch.set_num_threads(n_threads)
    return 0


def accuracy(args) -> int:
    """Spearman of cheap scorer variants against the exact score, on a proxy model trained on the
    bench pool (the real situation: a small trained model, real mixed-domain text)."""
    import tempfile

    from scipy.stats import spearmanr

    sys.path.insert(0, str(REPO))
    from quadsel.influence import InfluenceModel, build_proxy_model, make_scorer

    if not POOL.is_file():
        print(f"--accuracy needs the bench pool at {POOL}")
        return 2
    rows = [json.loads(line)["text"] for line in POOL.open(encoding="utf-8")]
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(rows))
    proxy_texts = [rows[i] for i in order[:5000]]
    fit = [rows[i] for i in order[5000:5100]]
    cand = [rows[i] for i in order[5100:5300]]
    ref_path = POOL.parent / "targets" / "gsm8k" / "reference.jsonl"
    ref = [json.loads(line)["text"] for line in ref_path.open(encoding="utf-8")][:20]
    proxy = Path(args.proxy_dir) if args.proxy_dir else Path(tempfile.mkdtemp()) / "proxy"
    t0 = time.perf_counter()
    if not (proxy / "config.json").is_file():
        build_proxy_model(proxy_texts, proxy, seed=args.seed)
    t_proxy = time.perf_counter() - t0
    im = InfluenceModel.load(proxy, max_length=128, batch_size=16, device="cpu")
    table = []
    for name, base_kw in (("grad-dot", {}), ("ekfac", {"damping": 0.1}), ("ekfac", {"damping": 1e-3,
                                                                                  "damping_mode": "absolute"})):
        exact = make_scorer(name, im, **base_kw).fit(fit).set_reference(ref)
        s_exact = exact.score(cand)
        for label, kw in (("projection_dim=8192, seed 0", {"projection_dim": 8192, "seed": 0}),
                          ("projection_dim=8192, seed 1", {"projection_dim": 8192, "seed": 1}),
                          ("projection_dim=32768", {"projection_dim": 32768}),
                          ("rank=8", {"rank": 8}), ("rank=32", {"rank": 32})):
            sc = make_scorer(name, im, **base_kw, **kw)
            sc.curvature, sc.is_fitted = exact.curvature, True
            rho = spearmanr(sc.set_reference(ref).score(cand), s_exact).statistic
            table.append((name, base_kw, label, rho))
            print(name, base_kw, label, f"{rho:.3f}", flush=True)
    lines = ["### Influence accuracy: cheap variants vs exact (proxy model, bench pool)\n",
             "Command: `python -m bench.influence_bench --accuracy`  ",
             f"Proxy: `build_proxy_model` defaults on 5,000 pool documents ({t_proxy:.0f}s here; "
             "~0 when reused via --proxy-dir). 100 pool documents fit the curvature, reference = first 20 of "
             "targets/gsm8k/reference.jsonl, 200 pool candidates, max_length 128. Spearman of each "
             "variant's scores against the same scorer's exact scores (same fitted curvature).\n",
             "| scorer | damping | variant | Spearman vs exact |", "|---|---|---|---:|"]
    for name, kw, label, rho in table:
        damp = "-" if not kw else (f"{kw['damping']} {kw.get('damping_mode', 'relative')}")
        lines.append(f"| {name} | {damp} | {label} | {rho:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    existing = out.read_text(encoding="utf-8") if out.is_file() else "## Influence\n\n"
    from quadsel.core.atomic import atomic_write_text

    atomic_write_text(out, replace_section(existing, lines[0], text))
    return 0


def _command_line() -> str:
    """The command as run, without --out (where the report goes)."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip or a.startswith("--out"):
            skip = a == "--out"
            continue
        argv.append(a)
    return " ".join(["python -m bench.influence_bench"] + argv)


def write_report(args, cfg, res, info) -> None:
    tps = {k: v["tokens"] / v["seconds"] for k, v in res.items() if "seconds" in v}
    lines = []
    cmd = _command_line()
    lines.append(section_header(args, cfg, info))
    lines.append(f"Command: `{cmd}`  ")
    dev = MACHINE if info["device"] == "cpu" else info["device"]
    lines.append(f"Machine: {dev}; Python {platform.python_version()}, torch {torch.__version__}, "
                 f"{torch.get_num_threads()} threads.  ")
    lines.append(f"Model: {cfg['arch']}-style from config, {info['n_params'] / 1e6:.2f}M params; tracked "
                 f"(attention + MLP) D_total = {info['d_total']:,} in {info['layers']} layers; "
                 f"{info['dtype'].replace('torch.', '')}, T = {cfg['seq']} tokens per row (full rows), "
                 f"batch {cfg['batch']}. Texts: {info['src']}. Feature dim {info['feat_dim']} "
                 f"(requested {args.dim}). Best of {args.repeats} after a warm-up.\n")
    lines.append("| path | rows | tokens/s (wall) | wall (s) | tokens per CPU-second |")
    lines.append("|---|---:|---:|---:|---:|")
    names = {"a1": "(a) naive LESS-style: per-example loop, full gradient, dense Gaussian projection of each row",
             "a16": "(a') the same, projecting 16 rows per matmul (LESS's `collect_grads`)",
             "b": "(b) quadsel `FeatureExtractor` (factored projection in hooks, no weight grads)",
             "b0": "(b0) floor of (b): forward + activation-only backward, no hooks",
             "c": "(c) plain forward + backward (weight grads)",
             "d exact": "(d) `ekfac` scorer, exact collapsed reference (no features)",
             "d rank 32": "(d) `ekfac` scorer, rank-32 reference"}
    for k in names:
        if k not in res:
            continue
        v = res[k]
        if "skipped" in v:
            lines.append(f"| {names[k]} | - | skipped: {v['skipped']} | - | - |")
            continue
        rows = args.naive_docs if k.startswith("a") else args.n_docs
        extra = (f" ({v['grad_seconds']:.2f} gradients + {v['project_seconds']:.2f} projection)"
                 if k.startswith("a") else "")
        lines.append(f"| {names[k]} | {rows} | {tps[k]:,.0f} | {v['seconds']:.2f}{extra} | "
                     f"{v['tokens'] / v['cpu']:,.0f} |")
    lines.append("")
    for k in ("a1", "a16"):
        if k in tps:
            r = tps["b"] / tps[k]
            rc = (res["b"]["tokens"] / res["b"]["cpu"]) / (res[k]["tokens"] / res[k]["cpu"])
            lines.append(f"- (b) vs {'(a)' if k == 'a1' else chr(40) + 'a' + chr(39) + chr(41)}: **{r:.0f}x** "
                         f"more tokens/s wall, {rc:.0f}x per CPU-second (goal >= 50x: "
                         f"{'met' if r >= 50 else 'NOT met'}); dense matrix {res[k]['matrix_gb']:.1f} GB.")
    r = res["b"]["seconds"] / res["c"]["seconds"]
    rc = res["b"]["cpu"] / res["c"]["cpu"]
    lines.append(f"- (b) / (c) time: **{r:.2f}x** wall, {rc:.2f}x CPU (goal <= 1.0x: "
                 f"{'met' if r <= 1.0 else 'NOT met'}; limit ~0.7x: {'met' if r <= 0.7 else 'not met'}).")
    if "b0" in res:
        lines.append(f"- (b) / (b0): {res['b']['seconds'] / res['b0']['seconds']:.2f}x wall, "
                     f"{res['b']['cpu'] / res['b0']['cpu']:.2f}x CPU: the cost of the hooks and projections "
                     f"over the forward + activation backward they ride on; (b0) / (c) = "
                     f"{res['b0']['cpu'] / res['c']['cpu']:.2f}x CPU is the best (b) / (c) can be here.")
    for k in ("d exact", "d rank 32"):
        if k in res:
            lines.append(f"- {k[2:]} EK-FAC scoring / (c) time: {res[k]['seconds'] / res['c']['seconds']:.2f}x.")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = Path(args.out)
    header = section_header(args, cfg, info)
    existing = out.read_text(encoding="utf-8") if out.is_file() else "## Influence\n\n"
    from quadsel.core.atomic import atomic_write_text

    atomic_write_text(out, replace_section(existing, header, text))


def section_header(args, cfg, info) -> str:
    dt = info["dtype"].replace("torch.", "")
    return f"### Influence features benchmark (`{args.model_size}`, T={cfg['seq']}, {info['device']}, {dt})\n"


def replace_section(existing: str, header: str, text: str) -> str:
    """Replace the section that starts with ``header`` (up to the next heading of level <= 3),
    or append ``text`` at the end; every other part of the file is kept."""
    import re

    lines = existing.splitlines(keepends=True)
    out, i, done = [], 0, False
    while i < len(lines):
        if lines[i] == header:
            i += 1
            while i < len(lines) and not re.match(r"#{1,3} ", lines[i]):
                i += 1
            out.append(text + "\n")
            done = True
        else:
            out.append(lines[i])
            i += 1
    if not done:  # new sections go before the README section, if there is one
        at = next((k for k, line in enumerate(out) if re.match(r"#{2,3} README section", line)), len(out))
        out.insert(at, ("\n" if at and out[at - 1].strip() else "") + text + "\n")
    return "".join(out)


# ============================================================== issue 17: scoring at the floor
FLOOR_DOC = """Scoring at the floor (``--floor SIZE:T ...``, default ``d256:256``; ``--only-floor`` skips the
rest): one thread, one process, interleaved rounds, best of ``--floor-repeats`` (process CPU time
and wall). Timed on the same model and texts:

- floor: forward + activation-only backward, no hooks (``GradientPass`` with no layers);
- fwd+bwd: a plain forward + ``loss.backward()`` with weight gradients;
- score pass: ``ekfac`` ``score(candidates)`` with the reference already set (exact; and rank 32);
- quadsel fit / kronfluence fit: the EK-FAC curvature on the fit texts (covariances, eigh, Λ);
- quadsel scoring / kronfluence scoring: the reference (preconditioned, mean over the reference)
  plus the candidates' scores: ``set_reference + score`` vs ``compute_pairwise_scores`` with
  ``aggregate_query_gradients=True``; same modules, damping (0.1 × mean Λ), empirical Fisher, fp32;
- the same two jobs with ``--floor-marginal K`` times the fit texts / the candidates (``... xK``):
  the difference is the cost per further fit text / candidate, the part that grows with the job
  (a job fits on ``scorer.fit_sample`` = 256 texts and scores thousands of candidates; the fixed
  part, eigendecompositions and preconditioning, is what the small job mostly measures);
- round as given / round length-sorted: a bandit round's worth of pool documents of their own
  lengths (``--floor-round-docs``) scored through the job's executor (``LocalPool``, in chunks of
  the model's batch size, as a job does, or ``--floor-round-batch``) in the order given, and in
  the order the job hands them over (``jobs.selection_run.length_order``: longest first, so each
  chunk is one batch of similar lengths).

Peak memory: each method once more in its own subprocess (``--mem-child``): after the setup
(model, texts, and the fit the method needs) freed heap is returned to the OS (``malloc_trim``),
the peak RSS is reset (``/proc/self/clear_refs`` = 5) and the reported number is ``VmHWM`` after
the method minus ``VmRSS`` before it.
"""


def floor_cfg(spec: str) -> dict:
    size, _, t = spec.partition(":")
    if size not in SIZES:
        raise SystemExit(f"--floor {spec}: unknown size {size!r}; one of {sorted(SIZES)}")
    cfg = dict(SIZES[size], name=size)
    if t:
        cfg["seq"] = int(t)
    return cfg


class _KronTask:
    """kronfluence Task: the per-example summed token loss (the scorer's), empirical Fisher."""

    def __new__(cls, modules):
        from kronfluence.task import Task

        from quadsel.influence.model import InfluenceModel

        class LMTask(Task):
            def _loss(self, batch, model):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                return InfluenceModel.summed_loss(logits, batch["input_ids"], batch["attention_mask"]).sum()

            def compute_train_loss(self, batch, model, sample=False):
                return self._loss(batch, model)

            def compute_measurement(self, batch, model):
                return self._loss(batch, model)

            def get_influence_tracked_modules(self):
                return modules

            def get_attention_mask(self, batch):
                return batch["attention_mask"]

        return LMTask()


def floor_setup(args, cfg: dict, methods) -> dict:
    """Model, texts and the callables of every timed method (kronfluence only if asked for)."""
    import copy
    import logging
    import tempfile

    sys.path.insert(0, str(REPO))
    from quadsel.influence import InfluenceModel, make_scorer
    from quadsel.influence.hooks import GradientPass
    from quadsel.influence.proxy import train_tokenizer

    T, B = cfg["seq"], cfg["batch"]
    n_c, n_f, n_r = args.floor_docs, args.floor_fit_docs, args.floor_ref_docs
    K = max(args.floor_marginal, 1)
    texts, src = load_texts(K * (n_c + n_f) + n_r, min_chars=8 * T, seed=args.seed)
    cand_k, fit_k, ref = texts[:K * n_c], texts[K * n_c:K * (n_c + n_f)], texts[K * (n_c + n_f):]
    cand, fit = cand_k[:n_c], fit_k[:n_f]
    tok = train_tokenizer(texts[:400], min(cfg["vocab"], 4096), T)
    model = build_model(cfg, torch.float32, args.seed)
    im = InfluenceModel(model, tok, max_length=T, batch_size=B, device="cpu")
    batches = list(im.batches(cand, B))
    st: dict = dict(im=im, src=src, n_tok=int(sum(int(b.attention_mask.sum()) for b in batches)),
                    n_params=sum(p.numel() for p in model.parameters()))
    sc = make_scorer("ekfac", im, damping=0.1)
    st["layers"] = len(sc.layers)
    fns: dict = {}

    def floor():
        with GradientPass(im, [], [], lambda *a: None) as gp:
            for b in batches:
                gp.run(b)

    def plain():
        for p in model.parameters():
            p.requires_grad_(True)
        for b in batches:
            model.zero_grad(set_to_none=True)
            im.summed_loss(im.logits(b), b.input_ids, b.attention_mask).sum().backward()
        model.zero_grad(set_to_none=True)

    fns["floor"], fns["fwd+bwd"] = floor, plain
    fitter = make_scorer("ekfac", im, damping=0.1)  # its own scorer: fitting resets a reference
    fns["quadsel fit"] = lambda: fitter.fit(fit)
    fns[f"quadsel fit x{K}"] = lambda: fitter.fit(fit_k)
    needs_ref = {"score pass", "score pass rank 32", "quadsel scoring", f"quadsel scoring x{K}",
                 "round as given", "round length-sorted"} & set(methods)
    if needs_ref:
        sc.fit(fit).set_reference(ref)
        low = make_scorer("ekfac", im, damping=0.1, rank=32)
        low.curvature, low.is_fitted = sc.curvature, True
        low.set_reference(ref)
        fns["score pass"] = lambda: sc.score(cand)
        fns["score pass rank 32"] = lambda: low.score(cand)
        fns["quadsel scoring"] = lambda: sc.set_reference(ref).score(cand)
        fns[f"quadsel scoring x{K}"] = lambda: sc.set_reference(ref).score(cand_k)
    if {"round as given", "round length-sorted"} & set(methods):
        from quadsel.jobs.selection_run import length_order
        from quadsel.pipeline.ray_runtime import LocalPool

        docs = round_docs(args.floor_round_docs, args.seed)
        chunk = args.floor_round_batch or B  # a job's chunk is its model's batch
        workers = LocalPool(lambda: sc, chunk_size=chunk)
        order = length_order(docs)
        fns["round as given"] = lambda: workers.score(docs)
        fns["round length-sorted"] = lambda: workers.score([docs[i] for i in order])
        lengths = np.array([len(x) for x in im.tokenize(docs)])
        st["round"] = dict(docs=len(docs), tokens=int(lengths.sum()), chunk=chunk, padded={
            "round as given": _padded_tokens(lengths, chunk, B),
            "round length-sorted": _padded_tokens(lengths[order], chunk, B)})
    if any(m.startswith("kronfluence") for m in methods):
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments

        logging.getLogger("kronfluence").setLevel(logging.ERROR)
        import warnings

        warnings.filterwarnings("ignore")
        task = _KronTask([t.name for t in sc.layers])
        kmodel = prepare_model(copy.deepcopy(model), task)
        tmp = tempfile.mkdtemp(prefix="kron_bench_")
        an = Analyzer(analysis_name="bench", model=kmodel, task=task, cpu=True, disable_tqdm=True, output_dir=tmp)

        def rows(ts):
            out = []
            for ids in im.tokenize(ts):
                x = torch.full((T,), im._fill_id, dtype=torch.long)
                m = torch.zeros(T, dtype=torch.long)
                x[:len(ids)], m[:len(ids)] = torch.tensor(ids), 1
                out.append({"input_ids": x, "attention_mask": m})
            return out

        f32 = torch.float32
        fargs = FactorArguments(strategy="ekfac", use_empirical_fisher=True, amp_dtype=None,
                                activation_covariance_dtype=f32, gradient_covariance_dtype=f32,
                                per_sample_gradient_dtype=f32, lambda_dtype=f32)
        sargs = ScoreArguments(damping_factor=None, amp_dtype=None, per_sample_gradient_dtype=f32,
                               precondition_dtype=f32, score_dtype=f32, aggregate_query_gradients=True)
        fit_rows, ref_rows, cand_rows = rows(fit), rows(ref), rows(cand)
        fit_rows_k, cand_rows_k = rows(fit_k), rows(cand_k)

        def kfit(data=fit_rows, name="f"):
            an.fit_all_factors(factors_name=name, dataset=data, per_device_batch_size=B, factor_args=fargs,
                               overwrite_output_dir=True)

        def kscore(data=cand_rows):
            an.compute_pairwise_scores(scores_name="s", factors_name="f", query_dataset=ref_rows,
                                       train_dataset=data, per_device_query_batch_size=B,
                                       per_device_train_batch_size=B, score_args=sargs, overwrite_output_dir=True)

        fns["kronfluence fit"], fns["kronfluence scoring"] = kfit, kscore
        fns[f"kronfluence fit x{K}"] = lambda: kfit(fit_rows_k, "fk")
        fns[f"kronfluence scoring x{K}"] = lambda: kscore(cand_rows_k)
        if {"kronfluence scoring", f"kronfluence scoring x{K}"} & set(methods):
            kfit()
    st["fns"] = {k: fns[k] for k in methods}
    return st


def round_docs(n: int, seed: int) -> list[str]:
    """``n`` pool documents as they are (their own lengths), as one bandit round hands them over."""
    rng = np.random.default_rng(seed + 1)
    docs, _ = pool_docs(seed)
    return [docs[i] for i in rng.permutation(len(docs))[:n]]


def _padded_tokens(lengths: np.ndarray, chunk: int, batch_size: int) -> int:
    """Tokens the model runs over when texts of these token ``lengths`` go to ``score`` in chunks
    of ``chunk`` (each chunk in batches of ``batch_size``, longest first, as ``InfluenceModel.batches``)."""
    from quadsel.influence.model import length_buckets

    total = 0
    for a in range(0, len(lengths), chunk):
        n = lengths[a:a + chunk]
        total += sum(len(b) * int(n[b].max()) for b in length_buckets(n, batch_size))
    return total


def floor_methods(k: int) -> list[str]:
    extra = [] if k <= 1 else [f"quadsel fit x{k}", f"kronfluence fit x{k}", f"quadsel scoring x{k}",
                               f"kronfluence scoring x{k}"]
    return ["floor", "fwd+bwd", "score pass", "score pass rank 32", "quadsel fit", "kronfluence fit",
            "quadsel scoring", "kronfluence scoring"] + extra + ["round as given", "round length-sorted"]


def _vm() -> dict[str, int]:
    import re

    return {k: int(v) for k, v in re.findall(r"(Vm\w+):\s+(\d+)", Path("/proc/self/status").read_text())}


def mem_child(args) -> int:
    """One method once, after its setup: the peak RSS it adds (printed as JSON)."""
    import gc

    torch.set_num_threads(args.threads or 1)
    cfg = floor_cfg(args.floor[0])
    st = floor_setup(args, cfg, [args.mem_child])
    fn = st["fns"][args.mem_child]
    gc.collect()
    try:  # hand the setup's freed heap back to the OS, so that reusing it counts as new memory
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    rss0 = _vm()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    print("MEM " + json.dumps({"peak_mb": (_vm()["VmHWM"] - rss0) / 1024}), flush=True)
    return 0


def floor_bench(args, spec: str) -> dict:
    import subprocess

    threads = args.threads or 1
    torch.set_num_threads(threads)
    cfg = floor_cfg(spec)
    methods = [m for m in floor_methods(args.floor_marginal)
               if not (args.skip_kronfluence and m.startswith("kronfluence"))]
    st = floor_setup(args, cfg, methods)
    fns = st["fns"]
    print(f"floor {spec}: {st['n_params'] / 1e6:.2f}M params, {st['layers']} tracked layers, "
          f"T={cfg['seq']}, batch {cfg['batch']}, {st['n_tok']} candidate tokens", flush=True)
    if args.profile:
        floor_profile(fns)
    best = interleaved_best(fns, args.floor_repeats, on_round=lambda r, b: print(
        f"  round {r + 1}: " + ", ".join(f"{k} {v[1]:.2f}" for k, v in b.items()), flush=True))
    mem = {}
    if not args.skip_memory:
        for k in fns:
            if k.startswith("round"):  # timing only: the score pass's memory is measured above
                continue
            cmd = [sys.executable, "-m", "bench.influence_bench", "--mem-child", k, "--floor", spec,
                   "--threads", str(threads), "--seed", str(args.seed)]
            for flag in ("floor_docs", "floor_fit_docs", "floor_ref_docs", "floor_marginal", "floor_round_docs",
                         "floor_round_batch"):
                if getattr(args, flag) is not None:
                    cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            out = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("MEM ")]
            mem[k] = json.loads(line[-1][4:])["peak_mb"] if line else None
            print(f"  peak memory {k}: {mem[k]} MB", flush=True)
    res = dict(spec=spec, cfg=cfg, best=best, mem=mem, n_tok=st["n_tok"], n_params=st["n_params"],
               layers=st["layers"], src=st["src"], threads=threads, round=st.get("round"))
    write_floor_report(args, res)
    return res


def mem_verdict(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None:
        return "not measured"
    return "met" if ours <= theirs else "NOT met"


def floor_profile(fns) -> None:
    """torch.profiler tables of the score pass and the fit: top ops, then time per hook and layer kind."""
    from torch.profiler import ProfilerActivity, profile

    for k in ("score pass", "quadsel fit", "floor"):
        if k not in fns:
            continue
        fns[k]()
        with profile(activities=[ProfilerActivity.CPU]) as p:
            fns[k]()
        ka = p.key_averages()
        print(f"===== profile: {k}")
        print(ka.table(sort_by="self_cpu_time_total", row_limit=12))
        hooks = sorted((e for e in ka if e.key.startswith("quadsel.")), key=lambda e: -e.cpu_time_total)
        for e in hooks:
            print(f"  {e.key:70s} {e.cpu_time_total / 1e3:9.1f} ms total  {e.count:4d} calls")


def write_floor_report(args, res) -> None:
    b, mem, cfg = res["best"], res["mem"], res["cfg"]
    cpu = {k: v[1] for k, v in b.items()}
    wall = {k: v[0] for k, v in b.items()}
    header = f"### Scoring at the floor (`{res['spec']}`, issue 17)\n"
    cmd = _command_line()
    lines = [header, f"Command: `{cmd}`  ",
             f"Machine: {MACHINE}; torch {torch.__version__}, {res['threads']} thread(s).  ",
             f"Model: llama-style from config (`{cfg['name']}`: hidden {cfg['hidden']}, {cfg['layers']} layers, "
             f"intermediate {cfg['inter']}, vocab {cfg['vocab']}), {res['n_params'] / 1e6:.2f}M params, "
             f"{res['layers']} tracked layers (attention + MLP); fp32, T = {cfg['seq']}, batch {cfg['batch']}. "
             f"{args.floor_docs} candidates ({res['n_tok']:,} tokens), {args.floor_fit_docs} fit texts, "
             f"{args.floor_ref_docs} reference texts; {res['src']}. Best of {args.floor_repeats} interleaved "
             f"rounds after a warm-up.\n",
             "| method | CPU (s) | wall (s) | peak memory (MB) |", "|---|---:|---:|---:|"]
    for k in b:
        m = mem.get(k)
        lines.append(f"| {k} | {cpu[k]:.2f} | {wall[k]:.2f} | {'-' if m is None else f'{m:.0f}'} |")
    lines.append("")

    def ratio(a, c):
        return f"{cpu[a] / cpu[c]:.2f}x CPU ({wall[a] / wall[c]:.2f}x wall)"

    lines.append(f"- score pass / floor: {ratio('score pass', 'floor')} (goal <= 1.05x: "
                 f"{'met' if cpu['score pass'] <= 1.05 * cpu['floor'] else 'NOT met'}); rank 32: "
                 f"{ratio('score pass rank 32', 'floor')}.")
    lines.append(f"- score pass / fwd+bwd: {ratio('score pass', 'fwd+bwd')} (goal <= 0.8x: "
                 f"{'met' if cpu['score pass'] <= 0.8 * cpu['fwd+bwd'] else 'NOT met'}); floor / fwd+bwd: "
                 f"{ratio('floor', 'fwd+bwd')}.")
    def mb(k):
        return "-" if mem.get(k) is None else f"{mem[k]:.0f}"

    K = args.floor_marginal
    for a, k, what, n in (("quadsel fit", "kronfluence fit", "fit text", args.floor_fit_docs),
                          ("quadsel scoring", "kronfluence scoring", "candidate", args.floor_docs)):
        if k in cpu:
            sp = cpu[k] / cpu[a]
            lines.append(f"- {a}: {sp:.2f}x faster than {k} by CPU ({wall[k] / wall[a]:.2f}x wall; goal >= 1.5x: "
                         f"{'met' if sp >= 1.5 else 'NOT met'}); peak memory {mb(a)} vs {mb(k)} MB (goal: no "
                         f"more: {mem_verdict(mem.get(a), mem.get(k))}).")
        ak, kk = f"{a} x{K}", f"{k} x{K}"
        if ak in cpu and kk in cpu:
            da, dk = (cpu[ak] - cpu[a]) / ((K - 1) * n), (cpu[kk] - cpu[k]) / ((K - 1) * n)
            lines.append(f"  - per further {what} (x{K} minus x1): quadsel {da:.3f} s, kronfluence {dk:.3f} s: "
                         f"{dk / da:.2f}x faster; the whole x{K} job {cpu[kk] / cpu[ak]:.2f}x.")
    rd = res.get("round")
    if rd and "round as given" in cpu:
        g, srt = rd["padded"]["round as given"], rd["padded"]["round length-sorted"]
        lines.append(f"- a round of {rd['docs']} pool documents ({rd['tokens']:,} tokens) in chunks of "
                     f"{rd['chunk']}: as given the model runs over {g:,} padded tokens, length-sorted "
                     f"over {srt:,}; time length-sorted / as given {ratio('round length-sorted', 'round as given')}.")
    text = "\n".join(lines) + "\n"
    print("\n" + text, flush=True)
    out = Path(args.out)
    existing = out.read_text(encoding="utf-8") if out.is_file() else "## Influence\n\n"
    from quadsel.core.atomic import atomic_write_text

    atomic_write_text(out, replace_section(existing, header, text))


if __name__ == "__main__":
    raise SystemExit(main())
