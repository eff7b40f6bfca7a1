"""Scorers: ``fit(texts)``, ``set_reference(texts)``, ``score(texts) -> float64 [n]``; a registry.

Sign convention for every scorer: higher = training on the example is predicted to lower the
reference loss more. For gradient scorers ``score = +<H⁻¹ ḡ_ref, g_cand>`` (loss gradients; a
gradient step of size η on the candidate lowers the reference loss by ≈ η·score for ``H = I``).

Gradient scorers (``grad-dot``, ``grad-cos``, ``kfac``, ``ekfac``) collapse the reference set to
one vector per layer: ``Q_l = H_l⁻¹ (1/m) Σ_j w_j G_{j,l}`` preconditioned in the FULL per-layer
space, then projected with the very same layout as the candidate side
(``C_l = P_o Q_l P_iᵀ``). A candidate is scored as ``Σ_l Σ_t (P_o δ_t)ᵀ C_l (P_i x_t)``, with no
stored features. ``projection_dim=None`` makes this exact; ``rank=r`` replaces ``C_l`` by its
best rank-r approximation (cheaper on big layers). ``grad-cos`` (LESS-style) uses
``w_j = 1/‖P g_j‖`` and divides the candidate's score by ``‖P g_cand‖``: the mean cosine.

Accuracy of the cheap variants (bench/results_influence.md): a random projection is unbiased, and
accurate for ``grad-dot``/``grad-cos``, but noisy for ``kfac``/``ekfac``: the preconditioned
reference has a large norm in low-curvature directions that candidates barely touch, and the JL
error scales with that norm. For curvature scorers prefer the exact default or ``rank``.

The base class, the registry and persistence live in :mod:`influence.base`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import torch

from .base import (
    Scorer,
    ScorerConfig,
    available_scorers,
    load_scorer,
    make_scorer,
    register_scorer,
)
from .curvature import Curvature, CurvatureArgs, load_curvature, make_curvature
from .hooks import GradientPass
from .layers import LayerSpec, find_layers
from .model import InfluenceModel, _check_texts
from .projection import Layout, LayoutMismatchError, Projector, make_layout

logger = logging.getLogger(__name__)


# ====================================================================== gradient scorers
@dataclass
class GradientConfig(ScorerConfig):
    """Options of the gradient scorers. ``damping``/``damping_mode``/``fisher`` configure the
    curvature of ``kfac``/``ekfac``; ``grad-dot``/``grad-cos`` have none and ignore them (accepted
    so that one job config can switch scorers by name)."""

    layers: LayerSpec = "all"
    # module names or regular expressions (whole dotted names) restricting the tracked layers,
    # e.g. [".*lora_[AB]\\.default"] for a peft model's LoRA adapters; None: every layer of ``layers``
    modules: list[str] | None = None
    include_lm_head: bool = False
    include_bias: bool = False
    projection_dim: int | tuple[int, int] | None = None  # None: exact fast path
    projection_kind: str = "orthogonal"
    seed: int = 0
    rank: int | None = None  # low-rank reference (per layer); None = full
    damping: float = 0.1
    damping_mode: Literal["absolute", "relative"] = "relative"
    fisher: Literal["empirical", "true"] = "empirical"


CurvatureConfig = GradientConfig  # kept as a name for the curvature scorers' options


def per_example_sq_norm(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``‖Σ_t d_t x_tᵀ‖_F²`` per example for ``x [B,T,i]``, ``d [B,T,o]``, without forming it
    when the Gram form ``Σ_{t,s} (d_t·d_s)(x_t·x_s)`` is cheaper."""
    B, T, i = x.shape
    o = d.shape[-1]
    if T * (i + o) < i * o:
        return ((d @ d.transpose(1, 2)) * (x @ x.transpose(1, 2))).sum((1, 2))
    g = torch.bmm(d.transpose(1, 2), x)
    return g.square().sum((1, 2))


class GradientScorer(Scorer):
    """Shared machinery of the gradient scorers; subclasses choose curvature and normalisation."""

    config_cls = GradientConfig
    curvature_name: ClassVar[str] = "identity"
    normalize: ClassVar[bool] = False
    needs_fit = False
    reference_free_fit = True  # the curvature is fitted on its own texts; saved with curvature.json

    def __init__(self, model: InfluenceModel, config: Any = None) -> None:
        super().__init__(model, config)
        c = self.config
        if c.rank is not None and (self.normalize or c.rank < 1):
            raise ValueError(f"scorer {self.name!r}: rank must be None" + ("" if self.normalize else " or >= 1"))
        if isinstance(c.modules, str):
            c.modules = [c.modules]
        self.layers = find_layers(model.model, c.layers, include_lm_head=c.include_lm_head,
                                  include_bias=c.include_bias, modules=c.modules)
        self.layout: Layout = make_layout(self.layers, c.projection_dim, c.seed, c.projection_kind)
        self.projector = Projector(self.layout, model.device)
        cargs = {k: getattr(c, k) for k in ("damping", "damping_mode", "fisher")}
        self.curvature: Curvature = make_curvature(self.curvature_name, **cargs)
        if self.curvature_name == "identity":
            self.curvature.fit(model, self.layers, [])
        # scoring state, per slot: (M_in, M_out) maps and the core C ([r_o, r_i] or diag [r])
        self._maps: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
        self._cores: list[torch.Tensor] = []
        self.reference_size = 0

    @property
    def bs(self) -> int | None:
        return self.config.batch_size

    # -------------------------------------------------------------- fit
    def fit(self, texts: Sequence[str]) -> "GradientScorer":
        texts = _check_texts(texts)
        if self.curvature_name != "identity":
            self.curvature.fit(self.model, self.layers, texts, self.bs)
        self.is_fitted = True
        self.has_reference = False if self.reference_size else self.has_reference
        if self.reference_size:
            logger.warning("scorer %s: refitted after set_reference; call set_reference again", self.name)
        return self

    # -------------------------------------------------------------- reference
    def _layout_sq_norms(self, texts: Sequence[str]) -> np.ndarray:
        """Per-example squared gradient norm in the layout (projected) space."""
        slots = self.layout.slots
        maps = [(self.projector.p_in(s), self.projector.p_out(s)) for s in slots]
        out = np.zeros(len(texts), dtype=np.float64)
        cur: dict[str, torch.Tensor] = {}

        def consumer(i, x, d):
            cur["n"] += per_example_sq_norm(x, d).double()

        with GradientPass(self.model, self.layers, maps, consumer) as gp:
            for b in self.model.batches(texts, self.bs):
                cur["n"] = torch.zeros(b.size, dtype=torch.float64, device=self.model.device)
                gp.run(b)
                out[b.index] = cur["n"].cpu().numpy()
        return out

    def _mean_gradient(self, texts: Sequence[str], weights: np.ndarray | None) -> list[torch.Tensor]:
        """``(1/m) Σ_j w_j G_j`` per layer in the full ``[out, in]`` space (float64, CPU)."""
        from quadsel.core.progress import Progress

        acc = [torch.zeros(t.out_features, t.in_features, dtype=torch.float64, device=self.model.device)
               for t in self.layers]

        def consumer(i, x, d):
            acc[i] += (d.reshape(-1, d.shape[-1]).T @ x.reshape(-1, x.shape[-1])).double()

        w_all = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        with GradientPass(self.model, self.layers, [(None, None)] * len(self.layers), consumer) as gp, \
                Progress("reference gradients", total=len(texts), unit="docs") as prog:
            for b in self.model.batches(texts, self.bs):
                w = None if w_all is None else w_all[torch.as_tensor(b.index)].to(self.model.device)
                gp.run(b, weights=w)
                prog.advance(b.size)
        return [(a / len(texts)).cpu() for a in acc]

    def set_reference(self, texts: Sequence[str]) -> "GradientScorer":
        texts = _check_texts(texts)
        if not texts:
            raise ValueError(f"scorer {self.name!r}: the reference set is empty")
        if not self.is_fitted:
            raise RuntimeError(f"scorer {self.name!r}: call fit(texts) before set_reference (the "
                               "curvature is fitted on a pool sample or the reference set)")
        weights = None
        if self.normalize:
            norms = np.sqrt(self._layout_sq_norms(texts))
            weights = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-30), 0.0)
        means = self._mean_gradient(texts, weights)
        maps, cores = [], []
        for slot, g in zip(self.layout.slots, means):
            # full per-layer space; float32 out: the projection and the core are float32
            q = self.curvature.precondition(slot.name, g, torch.float32)
            c = self.projector.project_matrix(slot, q)  # THEN the candidate-side projection
            m_in, m_out = self.projector.p_in(slot), self.projector.p_out(slot)
            if self.config.rank is not None and min(c.shape) > self.config.rank:
                m_in, m_out, c = _low_rank(c, self.config.rank, m_in, m_out, slot)
            maps.append((m_in, m_out))
            cores.append(c.to(self.model.device, torch.float32))
        self._maps, self._cores = maps, cores
        self.reference_size = len(texts)
        self.has_reference = True
        return self

    # -------------------------------------------------------------- score
    @torch.no_grad()
    def score(self, texts: Sequence[str]) -> np.ndarray:
        from quadsel.core.progress import Progress

        self._require_ready()
        texts = _check_texts(texts)
        dots = np.zeros(len(texts), dtype=np.float64)
        norms = np.zeros(len(texts), dtype=np.float64)
        cur: dict[str, torch.Tensor] = {}
        cores = self._cores
        normalize = self.normalize

        if normalize:
            maps = self._maps

            def consumer(i, x, d):
                c = cores[i]
                if c.ndim == 1:  # low rank: C = diag(s) in the rotated bases
                    s = ((d * c) * x).sum((1, 2))
                else:
                    s = ((d @ c) * x).sum((1, 2))
                cur["dot"] += s.double()
                cur["norm"] += per_example_sq_norm(x, d).double()
        else:
            # the core is folded into one of the maps: a candidate's score is then a plain
            # per-example dot product of the two mapped sides (see _score_maps)
            maps = self._score_maps()

            def consumer(i, x, d):
                cur["dot"] += (d * x).sum((1, 2)).double()  # (einsum copies here: 10-25x slower)

        with GradientPass(self.model, self.layers, maps, consumer) as gp, \
                Progress(f"{self.name} scores", total=len(texts), unit="docs") as prog:
            for b in self.model.batches(texts, self.bs):
                cur["dot"] = torch.zeros(b.size, dtype=torch.float64, device=self.model.device)
                cur["norm"] = torch.zeros(b.size, dtype=torch.float64, device=self.model.device)
                gp.run(b)
                dots[b.index] = cur["dot"].cpu().numpy()
                norms[b.index] = cur["norm"].cpu().numpy()
                prog.advance(b.size)
        if normalize:
            nrm = np.sqrt(norms)
            return np.where(nrm > 0, dots / np.where(nrm > 0, nrm, 1.0), 0.0)
        return dots

    def _score_maps(self) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Per slot, ``(M_in, M_out)`` with the core folded in, so that ``Σ_t δ_tᵀ M_outᵀ C M_in x_t``
        is ``Σ_t (M_out' δ_t)·(M_in' x_t)``: one matmul per token in a hook, no ``[B, T, in]``
        product temporaries. Per slot the cheaper side takes the core (ties: the side that keeps
        the smaller tensor until the backward, or none at all: an unmapped input shared by
        q/k/v is held once, uncopied). Cached per reference."""
        key = (list(self._cores), list(self._maps))  # held: identities cannot be reused meanwhile
        old = getattr(self, "_plan", None)
        if old is not None and len(old[0][0]) == len(key[0]) and \
                all(a is b for a, b in zip(old[0][0] + old[0][1], key[0] + key[1])):
            return old[1]
        plan = []
        for slot, (m_in, m_out), c in zip(self.layout.slots, self._maps, self._cores):
            if c.ndim == 1:  # diag(s) between two rank-r maps
                plan.append((c[:, None] * m_in, m_out))
                continue
            k_o, k_i = c.shape
            n_in, n_out = slot.in_features, slot.out_features
            cost_in = n_in * k_o + (n_out * k_o if m_out is not None else 0)  # C folded into M_in
            cost_out = n_out * k_i + (n_in * k_i if m_in is not None else 0)  # C folded into M_out
            keep_in = k_o  # the tensor the forward hook keeps: [B, T, k_o] ...
            keep_out = 0 if m_in is None else k_i  # ... or the layer's own input (no copy), or [B, T, k_i]
            if (cost_in, keep_in) < (cost_out, keep_out):
                plan.append((c if m_in is None else c @ m_in, m_out))
            else:
                plan.append((m_in, c.T.contiguous() if m_out is None else c.T @ m_out))
        self._plan = (key, plan)
        return plan

    # -------------------------------------------------------------- persistence
    def _extra_meta(self) -> dict:
        return {"layout": self.layout.to_dict(), "layout_hash": self.layout.hash,
                "reference_size": self.reference_size}

    def _save_state(self, directory: Path) -> None:
        from safetensors.torch import save_file

        from quadsel.core.atomic import atomic_path

        self.curvature.save(directory)
        if not self.has_reference:
            return
        state = {}
        for slot, (m_in, m_out), c in zip(self.layout.slots, self._maps, self._cores):
            state[f"{slot.name}::core"] = c.detach().cpu().contiguous()
            # the maps too (small): low-rank maps are data dependent, and stored projections make
            # a remote worker's scores bit-identical whatever its linear-algebra library
            for key, m in (("m_in", m_in), ("m_out", m_out)):
                if m is not None:
                    state[f"{slot.name}::{key}"] = m.detach().cpu().contiguous()
        with atomic_path(directory / "reference.safetensors") as tmp:
            save_file(state, str(tmp))

    def _load_state(self, directory: Path, meta: dict) -> None:
        from safetensors.torch import load_file

        saved = Layout.from_dict(meta["layout"])
        self.layout.check_same(saved, what=f"scorer at {directory}")
        if (directory / "curvature.json").is_file():
            cur = load_curvature(directory)
            if cur.name != self.curvature_name:
                raise ValueError(f"{directory}: curvature {cur.name!r} does not fit scorer {self.name!r}")
            self.curvature = cur
        self.reference_size = int(meta.get("reference_size", 0))
        ref = directory / "reference.safetensors"
        if not (meta.get("has_reference") and ref.is_file()):
            return
        st = load_file(str(ref))
        dev = self.model.device
        self._maps, self._cores = [], []
        for slot in self.layout.slots:
            self._cores.append(st[f"{slot.name}::core"].to(dev))
            m_in, m_out = st.get(f"{slot.name}::m_in"), st.get(f"{slot.name}::m_out")
            self._maps.append((None if m_in is None else m_in.to(dev), None if m_out is None else m_out.to(dev)))


def _low_rank(c: torch.Tensor, rank: int, m_in, m_out, slot):
    """``C ≈ U diag(s) Vᵀ``: fold ``Uᵀ``/``Vᵀ`` into the maps, keep ``s`` as a diagonal core."""
    u, s, vh = torch.linalg.svd(c.double().cpu(), full_matrices=False)
    u, s, vh = u[:, :rank].float(), s[:rank].float(), vh[:rank].float()
    dev = c.device
    new_out = u.T.to(dev) if m_out is None else u.T.to(dev) @ m_out
    new_in = vh.to(dev) if m_in is None else vh.to(dev) @ m_in
    return new_in, new_out, s.to(dev)


@register_scorer("grad-dot")
class GradDotScorer(GradientScorer):
    """TracIn-style: ``<ḡ_ref, g>`` (no curvature)."""

    unused_options = frozenset({"damping", "damping_mode", "fisher"})


@register_scorer("grad-cos")
class GradCosScorer(GradientScorer):
    """LESS-style: mean over the reference of ``cos(P g_ref, P g)``."""

    normalize = True
    unused_options = frozenset({"damping", "damping_mode", "fisher"})


@register_scorer("kfac")
class KFACScorer(GradientScorer):
    curvature_name = "kfac"
    needs_fit = True


@register_scorer("ekfac")
class EKFACScorer(GradientScorer):
    """Quad's influence: ``<(EK-FAC + λ)⁻¹ ḡ_ref, g>``."""

    curvature_name = "ekfac"
    needs_fit = True


__all__ = ["Scorer", "ScorerConfig", "GradientScorer", "GradientConfig", "CurvatureConfig",
           "register_scorer", "make_scorer", "available_scorers", "load_scorer", "LayoutMismatchError",
           "CurvatureArgs"]
