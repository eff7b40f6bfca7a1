"""Tracked layers: which weight matrices influence is computed for, and a uniform view of them.

Every ``nn.Linear`` and every transformers ``Conv1D`` (GPT-2; its weight is stored transposed,
``[in, out]``) inside an attention block or an MLP block is a candidate. Groups:

- ``"attention"``: modules whose dotted path has a component containing ``attn``/``attention``
  (Llama ``self_attn.q_proj``, GPT-2 ``attn.c_attn``, GPT-NeoX ``attention.query_key_value`` ...);
- ``"mlp"``: modules under an ``mlp``/``ffn``/``feed_forward`` block, or named like an MLP
  projection (``fc1``, ``fc2``, ``gate_proj``, ``dense_h_to_4h`` ...);
- ``"all"``: both.

Embeddings are never tracked; the output head (``lm_head``) only with ``include_lm_head=True``
(with tied input/output embeddings, as in GPT-2, its block is the gradient of the output
projection's use of the shared matrix, not of the embedding lookup). ``layers`` may also be an
explicit list of module names. A module called twice in one forward pass cannot be tracked.
``modules`` (a list of module names or regular expressions, each matched against the whole dotted
name) restricts the tracked layers further, e.g. ``[r".*lora_[AB]\\.default"]`` for the LoRA
adapters of a peft model; with ``modules`` any Linear/Conv1D may be chosen (not only attention/MLP
ones), and every pattern must match at least one of them.

Weights that are not a Linear/Conv1D (mixture-of-experts weights stored as one 3-D parameter,
Mixtral's ``experts.gate_up_proj``; a router stored as a bare parameter) cannot be tracked: a
group that contains such weights is refused with a :class:`UntrackableLayersError` naming them,
never skipped silently; choose ``layers="attention"`` or ``modules=`` to leave them out knowingly.
Layers that see flattened ``[B*T, in]`` inputs (OPT's ``fc1``/``fc2``) are supported.

Uniform view, whatever the module type: input ``x`` is ``[..., in]``, output gradient ``δ`` is
``[..., out]`` and the per-example gradient is ``G = Σ_t δ_t x_tᵀ`` of shape ``[out, in]``
(for Conv1D this is the TRANSPOSE of ``weight.grad``). With ``include_bias=True`` a constant 1 is
appended to ``x`` so that the last column of ``G`` is the bias gradient.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Sequence, Union

from torch import nn

from quadsel.core.errors import UntrackableLayersError

Group = Literal["attention", "mlp", "all"]
LayerSpec = Union[Group, Sequence[str]]

_ATTN_TOKENS = ("attn", "attention")
_MLP_BLOCK_TOKENS = ("mlp", "ffn", "feed_forward", "feedforward")
_MLP_NAMES = {
    "fc1", "fc2", "c_fc", "gate_proj", "up_proj", "down_proj", "dense_h_to_4h", "dense_4h_to_h",
    "w1", "w2", "w3", "wi", "wo", "fc_in", "fc_out", "gate_up_proj",
}


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers always present in this project
        return None
    return Conv1D


@dataclass(frozen=True)
class TrackedLayer:
    """One tracked weight matrix, seen as ``y = W x`` with ``W: [out_features, in_features]``.

    ``in_features`` counts the appended bias column when ``bias`` is True.
    """

    name: str
    kind: Literal["linear", "conv1d"]
    group: Literal["attention", "mlp", "lm_head", "other"]
    in_features: int
    out_features: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "group": self.group, "in": self.in_features,
                "out": self.out_features, "bias": self.bias}


def _group_of(name: str) -> Literal["attention", "mlp", "other"]:
    parts = name.lower().split(".")
    # the block the module lives in decides first (attention before MLP: "attn.c_proj")
    for p in parts[:-1]:
        if any(tok in p for tok in _ATTN_TOKENS):
            return "attention"
        if any(tok in p for tok in _MLP_BLOCK_TOKENS):
            return "mlp"
    last = parts[-1]
    if any(tok in last for tok in _ATTN_TOKENS):
        return "attention"
    if last in _MLP_NAMES or any(tok in last for tok in _MLP_BLOCK_TOKENS):
        return "mlp"
    return "other"


def untrackable_weights(model: nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(parameter name, group, shape)`` of every weight matrix (>= 2-D parameter) in an
    attention/MLP block that is not held by a Linear/Conv1D/embedding module."""
    conv1d = _conv1d_type()
    skip: tuple[type, ...] = (nn.Linear, nn.Embedding) + ((conv1d,) if conv1d is not None else ())
    out = []
    for mname, mod in model.named_modules():
        if isinstance(mod, skip):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.ndim < 2:
                continue
            full = f"{mname}.{pname}" if mname else pname
            group = _group_of(full)
            if group != "other":
                out.append((full, group, tuple(int(x) for x in p.shape)))
    return out


def _compile_modules(modules: Sequence[str]) -> list[re.Pattern]:
    if isinstance(modules, str):
        modules = [modules]
    pats = []
    for m in modules:
        if not isinstance(m, str) or not m:
            raise ValueError(f"modules: expected non-empty module names or regular expressions, got {m!r}")
        try:
            pats.append(re.compile(m))
        except re.error as exc:
            raise ValueError(f"modules: {m!r} is not a valid regular expression ({exc})") from None
    if not pats:
        raise ValueError("modules: the list is empty (give None to track every layer of the group)")
    return pats


def _shape(module: nn.Module, kind: str) -> tuple[int, int]:
    w = module.weight
    if kind == "linear":
        return int(w.shape[1]), int(w.shape[0])  # in, out
    return int(w.shape[0]), int(w.shape[1])  # Conv1D weight is [in, out]


def find_layers(
    model: nn.Module,
    layers: LayerSpec = "all",
    *,
    include_lm_head: bool = False,
    include_bias: bool = False,
    modules: Sequence[str] | None = None,
) -> list[TrackedLayer]:
    """Tracked layers of ``model`` in module registration order (the feature layout order)."""
    conv1d = _conv1d_type()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    candidates: list[tuple[str, nn.Module, str]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            kind = "linear"
        elif conv1d is not None and isinstance(mod, conv1d):
            kind = "conv1d"
        else:
            continue
        candidates.append((name, mod, kind))

    explicit = not isinstance(layers, str)
    if not explicit and layers not in ("attention", "mlp", "all"):
        raise ValueError(f"layers: expected 'attention', 'mlp', 'all' or a list of module names, got {layers!r}")
    wanted = set(layers) if explicit else None
    pats = _compile_modules(modules) if modules is not None else None
    if pats is not None and explicit:
        raise ValueError("give either an explicit list of layer names or modules=, not both")
    hits = [0] * len(pats or ())
    out: list[TrackedLayer] = []
    for name, mod, kind in candidates:
        is_head = mod is out_emb
        group = "lm_head" if is_head else _group_of(name)
        if pats is not None:
            matched = [j for j, p in enumerate(pats) if p.fullmatch(name)]
            for j in matched:
                hits[j] += 1
            if not matched or (layers != "all" and group != layers):
                continue
        elif explicit:
            if name not in wanted:  # type: ignore[operator]
                continue
        elif is_head:
            if not include_lm_head:
                continue
        elif group == "other" or (layers != "all" and group != layers):
            continue
        fin, fout = _shape(mod, kind)
        has_bias = include_bias and getattr(mod, "bias", None) is not None
        out.append(TrackedLayer(name=name, kind=kind, group=group, in_features=fin + int(has_bias),
                                out_features=fout, bias=has_bias))
    if explicit:
        missing = sorted(set(wanted) - {t.name for t in out})  # type: ignore[arg-type]
        if missing:
            raise ValueError(f"layers: no Linear/Conv1D module named {missing[:5]} in the model")
    if pats is not None:
        unmatched = [p.pattern for p, h in zip(pats, hits) if h == 0]
        if unmatched:
            sample = [n for n, _, _ in candidates][:6]
            raise ValueError(f"modules: {unmatched} match(es) no Linear/Conv1D module of the model "
                             f"(patterns match whole dotted names, e.g. {sample})")
        if not out:
            raise ValueError(f"modules={list(p.pattern for p in pats)} and layers={layers!r}: no module matches both")
    elif not explicit:
        bad = [(n, g, shp) for n, g, shp in untrackable_weights(model) if layers == "all" or g == layers]
        if bad:
            names = ", ".join(f"{n} {list(shp)}" for n, _, shp in bad[:4]) + (", ..." if len(bad) > 4 else "")
            raise UntrackableLayersError(
                f"layers={layers!r}: {len(bad)} weight(s) of {type(model).__name__} are not Linear/Conv1D "
                f"modules and cannot be tracked ({names}; e.g. mixture-of-experts weights stored as 3-D "
                "parameters). Refusing rather than skipping them silently: use layers='attention', or "
                "modules=[...] to choose the tracked Linear layers explicitly")
    if not out:
        raise ValueError(f"layers={layers!r}: no Linear/Conv1D layer of that group in the model")
    return out


def get_modules(model: nn.Module, layers: Sequence[TrackedLayer]) -> list[nn.Module]:
    mods = dict(model.named_modules())
    return [mods[t.name] for t in layers]
