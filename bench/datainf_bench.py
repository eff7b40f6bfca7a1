"""DataInf vs the exact damped inverse, on tiny models and real pool text (issue 8).

    python -m bench.datainf_bench

For each architecture (tiny Llama, tiny GPT-2 from configs) and damping, the ``datainf`` scorer's
scores are compared with the exact influence ``g_candᵀ (1/n Σ g_i g_iᵀ + λI)⁻¹ v`` computed densely
from autograd per-example gradients of the same layers (two small attention layers, so the d×d
solve fits). alpha = max‖g_i‖² / λ: DataInf's Sherman–Morrison average is close to the exact
inverse only for small alpha. Prints a Markdown table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
POOL = REPO.parent / "shared" / "data" / "bench" / "pool.jsonl"


def main() -> int:
    sys.path.insert(0, str(REPO / "tests"))
    from test_influence_datainf import LAYERS, autograd_grads  # the tests' autograd reference

    from quadsel.influence import make_scorer
    from quadsel.influence.testing import tiny_influence_model

    with open(POOL, encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for _, line in zip(range(200), fh)]
    fit, ref, cand = texts[:40], texts[40:45], texts[100:140]
    print("| arch | damping | max alpha | rel. error of w | Spearman | Pearson |")
    print("|---|---|---:|---:|---:|---:|")
    for arch in ("llama", "gpt2"):
        im = tiny_influence_model(arch, max_length=32, batch_size=8)
        layers = make_scorer("datainf", im, layers=LAYERS[arch]).layers
        gf, gr, gc = (autograd_grads(im, layers, t) for t in (fit, ref, cand))
        gmax = max(float((g * g).sum(1).max()) for g in gf)
        for label, kw in (("relative 0.1 (default)", {}), ("relative 10", {"damping": 10.0}),
                          ("absolute, alpha <= 1", {"damping": gmax, "damping_mode": "absolute"}),
                          ("absolute, alpha <= 1/3", {"damping": 3 * gmax, "damping_mode": "absolute"})):
            sc = make_scorer("datainf", im, layers=LAYERS[arch], **kw).fit(fit).set_reference(ref)
            s = sc.score(cand)
            exact = np.zeros(len(cand))
            rel, alpha = [], []
            for li, lam in enumerate(sc.lambdas):
                g, v = gf[li], gr[li].mean(0)
                n, d = g.shape
                w = torch.linalg.solve(g.T @ g / n + lam * torch.eye(d, dtype=torch.float64), v)
                c = (g @ v) / (lam + (g * g).sum(1))
                w_di = (v - (c[:, None] * g).mean(0)) / lam
                rel.append(float((w_di - w).norm() / w.norm()))
                alpha.append(float((g * g).sum(1).max() / lam))
                exact += (gc[li] @ w).numpy()
            print(f"| {arch} | {label} | {max(alpha):.3g} | {max(rel):.1%} | {spearmanr(s, exact)[0]:.3f} | "
                  f"{np.corrcoef(s, exact)[0, 1]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
