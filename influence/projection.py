"""Seeded factored random projections and the feature layout they define.

For a tracked layer with per-example gradient ``G = Σ_t δ_t x_tᵀ`` (``[out, in]``) the projected
feature is ``P_o G P_iᵀ = Σ_t (P_o δ_t)(P_i x_t)ᵀ`` (``[k_o, k_i]``), i.e.
``(P_o ⊗ P_i) vec(G)`` with row-major ``vec``. ``P_o``/``P_i`` are random with ``E[PᵀP] = I``
(``orthogonal``, the default: scaled Haar-random orthonormal rows; or ``gaussian``: i.i.d.
N(0, 1/k)), so ``E[(P_o⊗P_i)ᵀ(P_o⊗P_i)] = I`` and projected inner products are unbiased estimates
of the exact ones. A side whose dimension is not larger than its ``k`` is not projected (exact).

Feature layout (``[n, D]`` arrays): layers in module registration order; inside a layer the
``[k_o, k_i]`` block flattened row-major. With ``projection_dim=None`` every layer is exact and a
layer's block is its full gradient ``G`` (``[out, in]``, row-major; for GPT-2 Conv1D that is the
transpose of ``weight.grad``; with ``include_bias`` the last column is the bias gradient).

Each projection matrix is generated on the CPU from ``sha256(seed, layer name, side)``, so the
same seed gives the same matrices on any machine and device. The layout hash covers layer names,
shapes, projection dims, projection kind and seed; comparing features of different layouts
raises :class:`LayoutMismatchError`.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from quadsel.core.errors import LayoutMismatchError

from .layers import TrackedLayer

LAYOUT_VERSION = 1


@dataclass(frozen=True)
class Slot:
    """One layer's place in the feature vector."""

    name: str
    kind: str
    in_features: int
    out_features: int
    bias: bool
    k_out: int
    k_in: int
    offset: int

    @property
    def dim(self) -> int:
        return self.k_out * self.k_in

    @property
    def project_out(self) -> bool:
        return self.k_out < self.out_features

    @property
    def project_in(self) -> bool:
        return self.k_in < self.in_features


@dataclass(frozen=True)
class Layout:
    slots: tuple[Slot, ...]
    seed: int
    projection_dim: int | tuple[int, int] | None
    kind: str = "orthogonal"

    @property
    def dim(self) -> int:
        return sum(s.dim for s in self.slots)

    @property
    def exact(self) -> bool:
        return not any(s.project_in or s.project_out for s in self.slots)

    def to_dict(self) -> dict:
        pd = list(self.projection_dim) if isinstance(self.projection_dim, tuple) else self.projection_dim
        return {"version": LAYOUT_VERSION, "seed": self.seed, "projection_dim": pd,
                "projection": f"{self.kind}-factored", "slots": [asdict(s) for s in self.slots]}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        pd = d.get("projection_dim")
        pd = tuple(pd) if isinstance(pd, list) else pd
        kind = str(d.get("projection", "orthogonal-factored")).rsplit("-", 1)[0]
        return cls(slots=tuple(Slot(**s) for s in d["slots"]), seed=int(d["seed"]), projection_dim=pd, kind=kind)

    @property
    def hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def check_same(self, other: "Layout", what: str = "features") -> None:
        if self.hash != other.hash:
            mine = [(s.name, s.k_out, s.k_in) for s in self.slots][:3]
            theirs = [(s.name, s.k_out, s.k_in) for s in other.slots][:3]
            raise LayoutMismatchError(
                f"{what}: feature layouts differ (hash {self.hash} vs {other.hash}; seed {self.seed} vs "
                f"{other.seed}; {len(self.slots)} vs {len(other.slots)} layers; first {mine} vs {theirs})")


PROJECTION_KINDS = ("orthogonal", "gaussian")


def make_layout(layers: Sequence[TrackedLayer], projection_dim: int | tuple[int, int] | None,
                seed: int = 0, kind: str = "orthogonal") -> Layout:
    """Allocate per-layer projection dims.

    - ``None``: exact (identity) for every layer;
    - ``int D``: a budget of ``D // L`` per layer (L layers), split as ``k_o = k_i = ⌊√budget⌋``
      (capped at the layer's dims; a capped side is exact and leaves more budget to the other).
      The real total (``Layout.dim``) is at most ``D``;
    - ``(k_o, k_i)``: the same factors for every layer (capped at its dims).
    """
    if not layers:
        raise ValueError("no tracked layers")
    if kind not in PROJECTION_KINDS:
        raise ValueError(f"projection kind: expected one of {PROJECTION_KINDS}, got {kind!r}")
    slots = []
    offset = 0
    if isinstance(projection_dim, (tuple, list)):
        if len(projection_dim) != 2 or min(projection_dim) < 1:
            raise ValueError(f"projection_dim: expected (k_out, k_in) >= 1, got {projection_dim!r}")
        projection_dim = (int(projection_dim[0]), int(projection_dim[1]))
    elif projection_dim is not None:
        projection_dim = int(projection_dim)
        if projection_dim < len(layers):
            raise ValueError(f"projection_dim={projection_dim} is smaller than the number of tracked "
                             f"layers ({len(layers)}); give at least one dimension per layer")
    for t in layers:
        if projection_dim is None:
            k_o, k_i = t.out_features, t.in_features
        elif isinstance(projection_dim, tuple):
            k_o, k_i = min(projection_dim[0], t.out_features), min(projection_dim[1], t.in_features)
        else:
            budget = projection_dim // len(layers)
            k = max(1, math.isqrt(budget))
            if t.out_features <= k:
                k_o = t.out_features
                k_i = max(1, min(t.in_features, budget // k_o))
            elif t.in_features <= k:
                k_i = t.in_features
                k_o = max(1, min(t.out_features, budget // k_i))
            else:
                k_o, k_i = k, max(1, min(t.in_features, budget // k))
        slots.append(Slot(name=t.name, kind=t.kind, in_features=t.in_features, out_features=t.out_features,
                          bias=t.bias, k_out=k_o, k_in=k_i, offset=offset))
        offset += k_o * k_i
    return Layout(slots=tuple(slots), seed=int(seed), projection_dim=projection_dim, kind=kind)


def _derived_seed(seed: int, name: str, side: str) -> int:
    h = hashlib.sha256(f"{seed}:{name}:{side}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def projection_matrix(seed: int, name: str, side: str, k: int, d: int, kind: str = "orthogonal") -> torch.Tensor:
    """``[k, d]`` float32 random projection with ``E[PᵀP] = I``, generated on the CPU.

    ``gaussian``: i.i.d. N(0, 1/k). ``orthogonal``: ``sqrt(d/k)`` times k Haar-random orthonormal
    rows (lower variance than Gaussian, markedly so when k is not much smaller than d).
    """
    g = torch.Generator(device="cpu")
    g.manual_seed(_derived_seed(seed, name, side))
    z = torch.randn(k, d, generator=g, dtype=torch.float64)
    if kind == "gaussian":
        return (z / math.sqrt(k)).float()
    q, r = torch.linalg.qr(z.T)  # [d, k] orthonormal columns
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    return (q.T * math.sqrt(d / k)).float()


class Projector:
    """The projection matrices of a layout, materialised lazily on one device."""

    def __init__(self, layout: Layout, device: torch.device | str = "cpu") -> None:
        self.layout = layout
        self.device = torch.device(device)
        self._cache: dict[tuple[str, str], torch.Tensor | None] = {}

    def p_in(self, slot: Slot) -> torch.Tensor | None:
        """``P_i`` ``[k_in, in]`` or None for an exact side."""
        return self._get(slot, "in", slot.k_in, slot.in_features, slot.project_in)

    def p_out(self, slot: Slot) -> torch.Tensor | None:
        return self._get(slot, "out", slot.k_out, slot.out_features, slot.project_out)

    def _get(self, slot: Slot, side: str, k: int, d: int, active: bool) -> torch.Tensor | None:
        key = (slot.name, side)
        if key not in self._cache:
            self._cache[key] = (projection_matrix(self.layout.seed, slot.name, side, k, d, self.layout.kind)
                                .to(self.device)
                                if active else None)
        return self._cache[key]

    def project_matrix(self, slot: Slot, m: torch.Tensor) -> torch.Tensor:
        """``P_o M P_iᵀ`` for a full per-layer matrix ``M`` (``[out, in]``) -> ``[k_o, k_i]``."""
        m = m.to(self.device, torch.float32)
        po, pi = self.p_out(slot), self.p_in(slot)
        if po is not None:
            m = po @ m
        if pi is not None:
            m = m @ pi.T
        return m
