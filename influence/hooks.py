"""Hooks that hand each tracked layer's (mapped) inputs and output gradients to a consumer.

One pass over a batch:

1. forward hook on every tracked layer: ``x`` (``[B, T, in]``, or ``[B*T, in]`` for layers that
   see flattened tokens, as OPT's MLP; always handed on as ``[B, T, in]``; padding zeroed, a 1 appended when
   the bias is tracked) is mapped right away, ``x̃ = x M_inᵀ`` (``M_in`` a projection, an
   eigenbasis, or nothing), and a gradient hook is put on the layer's output;
2. the loss is the SUM of the per-example summed token losses (optionally weighted);
3. ``torch.autograd.grad`` w.r.t. the embedding output only: every parameter has
   ``requires_grad=False`` during the pass, so no weight gradient is ever formed;
4. the output-gradient hook maps ``δ`` (``[B, T, out]``, padding zeroed) to ``δ̃ = δ M_outᵀ`` and
   calls ``consumer(layer_index, x̃, δ̃)``.

Because the per-example loss is a sum and examples do not interact in a causal LM forward,
``δ`` of example ``b`` only carries example ``b``'s loss: ``Σ_t δ̃_bt x̃_btᵀ`` is that example's
own (mapped) gradient.
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable, Literal, Sequence

import torch
from torch import nn

from .layers import TrackedLayer, get_modules
from .model import Batch, InfluenceModel

Consumer = Callable[[int, torch.Tensor, torch.Tensor], None]
Maps = Sequence[tuple[torch.Tensor | None, torch.Tensor | None]]  # per layer: (M_in, M_out)


@contextlib.contextmanager
def _frozen_params(model: nn.Module):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


class GradientPass:
    """Context manager that installs the hooks; call :meth:`run` once per batch."""

    def __init__(self, im: InfluenceModel, layers: Sequence[TrackedLayer], maps: Maps,
                 consumer: Consumer) -> None:
        if len(maps) != len(layers):
            raise ValueError("one (M_in, M_out) pair per tracked layer is required")
        self.im = im
        self.layers = list(layers)
        conv: dict[int, torch.Tensor] = {}

        def to_dev(m):  # one converted copy per distinct map (layers may share an eigenbasis)
            if m is None:
                return None
            if id(m) not in conv:
                conv[id(m)] = m.to(im.device, torch.float32)
            return conv[id(m)]

        self.maps = [(to_dev(a), to_dev(b)) for a, b in maps]
        self.consumer = consumer
        self._handles: list = []
        self._stack = contextlib.ExitStack()
        self._x: dict[int, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self._leaf: list[torch.Tensor] = []
        self._done: set[int] = set()
        self._full = False  # the batch has no padding: nothing to mask
        self._last: tuple | None = None  # (input tensor, M_in, bias, mapped input) of the last forward hook
        self._views: dict[int, tuple[torch.Tensor, int]] = {}  # uncopied inputs and their versions

    # ---------------------------------------------------------------- hook plumbing
    def __enter__(self) -> "GradientPass":
        model = self.im.model
        self._stack.enter_context(_frozen_params(model))
        emb = model.get_input_embeddings()
        if emb is None:
            raise ValueError("the model has no input embedding module (get_input_embeddings() is None)")
        self._handles.append(emb.register_forward_hook(self._embedding_hook))
        for i, mod in enumerate(get_modules(model, self.layers)):
            self._handles.append(mod.register_forward_hook(self._make_forward_hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.close()

    def _embedding_hook(self, module, inputs, output):
        leaf = output.detach().requires_grad_(True)
        self._leaf.append(leaf)
        return leaf

    def _make_forward_hook(self, i: int):
        layer = self.layers[i]
        label = f"quadsel.forward_hook[{_kind(layer.name)}]"

        def hook(module, inputs, output):
            if i in self._x or i in self._done:
                raise RuntimeError(f"layer {layer.name} ran twice in one forward pass; shared/reused "
                                   "modules are not supported as tracked layers")
            with _label(label):
                x = inputs[0]
                m_in = self.maps[i][0]
                last = self._last
                if last is not None and last[0] is x and last[1] is m_in and last[2] == layer.bias:
                    # a layer fed by the very same tensor as the previous one (q/k/v, gate/up): its
                    # mapped input is the same tensor (consumers never modify x in place)
                    self._x[i] = last[3]
                else:
                    self._x[i] = self._map_input(layer, x, m_in)
                    self._last = (x, m_in, layer.bias, self._x[i])
            if output.requires_grad:
                output.register_hook(self._make_backward_hook(i))
            return None

        return hook

    def _map_input(self, layer: TrackedLayer, x: torch.Tensor, m_in: torch.Tensor | None) -> torch.Tensor:
        mask = self._mask
        B, T = mask.shape[:2]
        # [B, T, in], or flattened [B*T, in] in (example, token) order (OPT's fc1/fc2)
        if x.numel() // x.shape[-1] != B * T or not (x.shape[0] == B or (x.ndim == 2 and x.shape[0] == B * T)):
            raise RuntimeError(f"layer {layer.name}: input shape {tuple(x.shape)} is neither [B, T, in] nor "
                               f"[B*T, in] for a batch of {B}x{T}")
        xf = x.detach().reshape(B, T, x.shape[-1]).float()
        if layer.bias:
            xf = torch.cat([xf, torch.ones_like(mask)], dim=-1)
        if m_in is not None:
            xf = xf @ m_in.T  # a new tensor: masked in place below
        elif xf.data_ptr() == x.data_ptr():  # a view of the layer's own input
            if not self._full:
                return xf * mask
            # no padding: nothing to mask, no copy; checked unchanged when consumed
            self._views[id(xf)] = (xf, xf._version)
            return xf
        # masking rows commutes with the map: mask the smaller tensor; a batch without padding
        # (length-sorted batches of full rows) is not touched at all
        return xf if self._full else xf.mul_(mask)

    def _check_view(self, i: int, x: torch.Tensor) -> None:
        v = self._views.get(id(x))
        if v is not None and v[0] is x and x._version != v[1]:
            raise RuntimeError(f"layer {self.layers[i].name}: its input was modified in place after the "
                               "layer ran; such models are not supported")

    def _make_backward_hook(self, i: int):
        label = f"quadsel.backward_hook[{_kind(self.layers[i].name)}]"

        def hook(grad):
            with _label(label):
                mask = self._mask
                B, T = mask.shape[:2]
                d = grad.detach().reshape(B, T, grad.shape[-1]).float()
                m_out = self.maps[i][1]
                if m_out is not None:
                    d = d @ m_out.T
                    if not self._full:
                        d.mul_(mask)
                elif not self._full:
                    d = d * mask
                x = self._x.pop(i)
                self._check_view(i, x)
                self._done.add(i)
                self.consumer(i, x, d)
            return None

        return hook

    # ---------------------------------------------------------------- one batch
    def run(self, batch: Batch, *, weights: torch.Tensor | None = None,
            fisher: Literal["empirical", "true"] = "empirical",
            generator: torch.Generator | None = None) -> torch.Tensor:
        """Forward + activation-only backward of one batch; returns the per-example losses."""
        self._x.clear()
        self._done.clear()
        self._leaf.clear()
        self._mask = batch.attention_mask.to(torch.float32).unsqueeze(-1)
        self._full = bool(batch.attention_mask.all())
        self._last = None
        self._views.clear()
        try:
            with torch.enable_grad():
                logits = self.im.logits(batch)
                labels = None
                if fisher == "true":
                    labels = _sample_labels(logits, generator)
                elif fisher != "empirical":
                    raise ValueError(f"fisher: expected 'empirical' or 'true', got {fisher!r}")
                loss = self.im.summed_loss(logits, batch.input_ids, batch.attention_mask, labels)
                total = (loss * weights.to(loss)).sum() if weights is not None else loss.sum()
                if not self._leaf:
                    raise RuntimeError("the input embedding hook did not run")
                if total.requires_grad:
                    torch.autograd.grad(total, self._leaf, allow_unused=True)
            # layers that got no gradient (not on the loss path): their gradient is zero
            for i in list(self._x):
                x = self._x.pop(i)
                self._check_view(i, x)
                m_out = self.maps[i][1]
                k_out = m_out.shape[0] if m_out is not None else self.layers[i].out_features
                self.consumer(i, x, x.new_zeros(x.shape[0], x.shape[1], k_out))
        finally:
            self._x.clear()
            self._leaf.clear()
            self._mask = None
            self._last = None
            self._views.clear()
        return loss.detach()


_DIGITS = re.compile(r"\.\d+\.")


def _kind(name: str) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``model.layers.*.mlp.up_proj`` (profiler labels per layer kind)."""
    return _DIGITS.sub(".*.", name)


def _label(name: str):
    """A profiler range, only while a profiler is recording (no cost otherwise)."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def _sample_labels(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Targets sampled from the model's own next-token distribution (true Fisher)."""
    with torch.no_grad():
        probs = torch.softmax(logits.detach().float(), dim=-1)
        B, T, V = probs.shape
        flat = probs.reshape(-1, V)
        if generator is not None and generator.device != flat.device:
            flat = flat.cpu()
        sampled = torch.multinomial(flat, 1, generator=generator).view(B, T).to(logits.device)
    # summed_loss predicts labels[:, 1:] from position t-1: shift the samples right by one
    labels = torch.zeros_like(sampled)
    labels[:, 1:] = sampled[:, :-1]
    return labels
