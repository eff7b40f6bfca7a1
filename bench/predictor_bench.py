"""``predictor`` scorer on real data: held-out Spearman vs exact EK-FAC, and the per-text speedup.

    python -m bench.predictor_bench                      # defaults below, CPU
    python -m bench.predictor_bench --proxy-dir /tmp/p   # reuse (or write) the proxy model there

One run: a proxy model (``influence.build_proxy_model``, few steps) trained on a pool sample; the
``predictor`` scorer (base ``ekfac``, exact) fitted on ``--fit`` pool texts and a target's reference
set, labelling ``--label`` of them; then on ``--test`` OTHER pool texts the exact EK-FAC scores are
compared with the predictions of every variant (regressor x features x target, all fitted on the
same labelled sample), with a length-only baseline and a shuffled-label control. Timings: the
base's ``score`` and the predictor's ``score`` on the same texts, interleaved, best of
``--repeats`` (wall and process CPU).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "bench"


def _read(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.open(encoding="utf-8")]


def _best(fn, repeats: int) -> tuple[float, float]:
    wall, cpu = math.inf, math.inf
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="gsm8k")
    ap.add_argument("--n-ref", type=int, default=100, help="reference texts used (first n)")
    ap.add_argument("--fit", type=int, default=512, help="pool texts the base is fitted on (= pool sample)")
    ap.add_argument("--label", type=int, default=512, help="label_sample")
    ap.add_argument("--test", type=int, default=800, help="held-out pool texts scored exactly")
    ap.add_argument("--time-docs", type=int, default=200, help="texts for the timing comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--proxy-dir", default="/tmp/quadsel_predictor_bench/proxy")
    ap.add_argument("--proxy-steps", type=int, default=150)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    logging.basicConfig(level=logging.WARNING)
    from scipy.stats import spearmanr

    from quadsel.influence import InfluenceModel, build_proxy_model, make_scorer
    from quadsel.influence.predictor import fit_regressor, forward_features, token_counts

    rng = np.random.default_rng(args.seed)
    pool = _read(DATA / "pool.jsonl")
    ref = _read(DATA / "targets" / args.target / "reference.jsonl")[: args.n_ref]
    order = rng.permutation(len(pool))
    proxy = Path(args.proxy_dir)
    t0 = time.perf_counter()
    if not (proxy / "config.json").is_file():
        build_proxy_model([pool[i] for i in order[:4000]], proxy, seed=args.seed, steps=args.proxy_steps,
                          max_length=args.max_length)
    print(f"proxy: {proxy} ({time.perf_counter() - t0:.0f}s)")
    im = InfluenceModel.load(proxy, max_length=args.max_length, batch_size=args.batch_size, device="cpu")
    fit_texts = [pool[i] for i in order[4000:4000 + args.fit]]
    test = [pool[i] for i in order[4000 + args.fit:4000 + args.fit + args.test]]

    t0 = time.perf_counter()
    sc = make_scorer("predictor", im, label_sample=args.label, seed=args.seed)
    sc.fit(fit_texts)
    t_fit = time.perf_counter() - t0
    sc.set_reference(ref)
    print(f"fit {t_fit:.0f}s, set_reference (label {args.label} + regress) {time.perf_counter() - t0 - t_fit:.0f}s")
    print("report:", json.dumps(sc.report, indent=1))
    texts_l, _, y_l = sc.labelled

    t0 = time.perf_counter()
    y_t = sc.base.score(test)
    print(f"exact ekfac on {len(test)} test texts: {time.perf_counter() - t0:.0f}s")

    rows = []
    feats: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    for layer in (-1, 1):
        for kind in ("hidden", "hidden+loss"):
            w = kind == "hidden+loss"
            feats[(kind, layer)] = (forward_features(im, texts_l, layer=layer, with_loss=w),
                                    forward_features(im, test, layer=layer, with_loss=w))
    base_cfg = sc.config
    rho = lambda a, b: float(spearmanr(a, b).statistic)  # noqa: E731
    x_l, x_t = feats[("hidden+loss", -1)]
    rows.append(("length only", rho(token_counts(x_t), y_t), None))
    rows.append(("summed loss only", rho(x_t[:, -3], y_t), None))
    for reg in ("ridge", "mlp"):
        for (kind, layer), (xl, xt) in feats.items():
            for target in ("score", "per_token"):
                if layer != -1 and (reg == "mlp" or target == "per_token"):
                    continue
                cfg = replace(base_cfg, regressor=reg, features=kind, target=target, feature_layer=layer)
                r, info = fit_regressor(xl, y_l, cfg, args.seed)
                pred = r.predict(xt)
                shuf = y_l[np.random.default_rng(args.seed + 5).permutation(len(y_l))]
                ctrl = fit_regressor(xl, shuf, cfg, args.seed)[0].predict(xt)
                rows.append((f"{reg} {kind} layer={layer} target={target}", rho(pred, y_t), rho(ctrl, y_t)))
    # learning curve of the default configuration
    for n in (64, 128, 256):
        if n < len(y_l):
            sub = np.random.default_rng(args.seed).choice(len(y_l), n, replace=False)
            r, _ = fit_regressor(x_l[sub], y_l[sub], base_cfg, args.seed)
            rows.append((f"default config, {n} labels", rho(r.predict(x_t), y_t), None))

    print(f"\nheld-out pool texts: {len(test)}; labelled: {len(y_l)}; target {args.target} ({len(ref)} ref)")
    print(f"{'variant':<50} {'Spearman':>9} {'shuffled':>9}")
    for name, s, c in rows:
        print(f"{name:<50} {s:9.3f} {'' if c is None else f'{c:9.3f}':>9}")

    timed = test[: args.time_docs]
    hidden_only = make_scorer("predictor", im, features="hidden")
    hidden_only.regressor = fit_regressor(*[feats[("hidden", -1)][0], y_l],
                                          replace(base_cfg, features="hidden"), args.seed)[0]
    hidden_only.is_fitted = hidden_only.has_reference = True
    sc.score(timed[:8]), sc.base.score(timed[:8])  # warm-up
    res = {}
    for _ in range(args.repeats):  # interleaved rounds
        for name, fn in (("base ekfac", sc.base.score), ("predictor hidden+loss", sc.score),
                         ("predictor hidden", hidden_only.score)):
            w, c = _best(lambda: fn(timed), 1)
            old = res.get(name, (math.inf, math.inf))
            res[name] = (min(old[0], w), min(old[1], c))
    print(f"\ntiming on {len(timed)} texts (max_length {args.max_length}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}), best of {args.repeats}:")
    bw, bc = res["base ekfac"]
    for name, (w, c) in res.items():
        print(f"  {name:<24} {1e3 * w / len(timed):8.2f} ms/text wall ({bw / w:5.2f}x)  "
              f"{1e3 * c / len(timed):8.2f} ms/text cpu ({bc / c:5.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
