"""Per-example projected gradient features ``[n, D]`` (LESS / TRAK style), via factored projections.

``FeatureExtractor(im, layers="all", projection_dim=8192, seed=0).compute(texts)`` returns
:class:`Features`: the array plus the :class:`~influence.projection.Layout` it was built with.
``projection_dim=None`` gives the exact per-example gradients (layout documented in
``influence.projection``). Neither ``W.grad`` nor a full per-example gradient is ever formed
when projecting: ``x`` is projected in the forward hook and ``δ`` in the backward hook.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from .hooks import GradientPass
from .layers import LayerSpec, find_layers
from .model import Batch, InfluenceModel
from .projection import Layout, LayoutMismatchError, Projector, make_layout

__all__ = ["Features", "FeatureExtractor", "LayoutMismatchError"]


@dataclass
class Features:
    values: np.ndarray  # [n, D] float32 or float16
    layout: Layout

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.values.shape[1] != self.layout.dim:
            raise ValueError(f"features: expected [n, {self.layout.dim}], got {self.values.shape}")

    def check_compatible(self, other: "Features") -> None:
        self.layout.check_same(other.layout)

    def dot(self, other: "Features") -> np.ndarray:
        """Pairwise inner products ``[n_self, n_other]`` (float64); layouts must match."""
        self.check_compatible(other)
        return self.values.astype(np.float64) @ other.values.astype(np.float64).T

    def layer_block(self, name: str) -> np.ndarray:
        """One layer's features reshaped to ``[n, k_out, k_in]``."""
        for s in self.layout.slots:
            if s.name == name:
                return self.values[:, s.offset:s.offset + s.dim].reshape(-1, s.k_out, s.k_in)
        raise KeyError(name)


class FeatureExtractor:
    def __init__(self, im: InfluenceModel, *, layers: LayerSpec = "all",
                 projection_dim: int | tuple[int, int] | None = 8192, seed: int = 0,
                 projection_kind: str = "orthogonal",
                 include_lm_head: bool = False, include_bias: bool = False,
                 dtype: str | torch.dtype = "float32", modules: Sequence[str] | None = None) -> None:
        self.im = im
        self.layers = find_layers(im.model, layers, include_lm_head=include_lm_head, include_bias=include_bias,
                                  modules=modules)
        self.layout = make_layout(self.layers, projection_dim, seed, projection_kind)
        self.projector = Projector(self.layout, im.device)
        self.out_dtype = {"float32": np.float32, "fp32": np.float32, "float16": np.float16,
                          "fp16": np.float16, torch.float32: np.float32, torch.float16: np.float16}.get(dtype)
        if self.out_dtype is None:
            raise ValueError(f"dtype: expected float32 or float16, got {dtype!r}")

    def maps(self):
        return [(self.projector.p_in(s), self.projector.p_out(s)) for s in self.layout.slots]

    @torch.no_grad()
    def compute(self, texts: Sequence[str], batch_size: int | None = None) -> Features:
        return self.compute_batches(self.im.batches(texts, batch_size), len(texts))

    @torch.no_grad()
    def compute_batches(self, batches: Iterable[Batch], n: int) -> Features:
        """Features for pre-built batches whose ``index`` values lie in ``range(n)``."""
        from quadsel.core.progress import Progress

        out = np.zeros((n, self.layout.dim), dtype=self.out_dtype)
        slots = self.layout.slots
        buf: dict[str, torch.Tensor] = {}

        def consumer(i: int, x: torch.Tensor, d: torch.Tensor) -> None:
            s = slots[i]
            g = torch.bmm(d.transpose(1, 2), x)  # [B, k_out, k_in] = Σ_t (P_o δ_t)(P_i x_t)ᵀ
            buf["out"][:, s.offset:s.offset + s.dim] = g.reshape(g.shape[0], -1)

        with GradientPass(self.im, self.layers, self.maps(), consumer) as gp, \
                Progress("influence features", total=n, unit="docs") as prog:
            for b in batches:
                buf["out"] = torch.empty(b.size, self.layout.dim, device=self.im.device)
                gp.run(b)
                out[b.index] = buf["out"].cpu().numpy().astype(self.out_dtype, copy=False)
                prog.advance(b.size)
        return Features(values=out, layout=self.layout)
