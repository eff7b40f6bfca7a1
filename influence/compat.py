"""Model/scorer compatibility, checked before anything runs.

``check_compatible(model, scorer, **options) -> list[str]`` returns the problems (one line each,
naming the modules concerned; empty = compatible). ``model`` may be a loaded model
(``nn.Module`` or :class:`~influence.model.InfluenceModel`), a transformers config, or a model
directory / hub id of which only ``config.json`` is read: the model is then built on the meta
device (no weights, no memory), so a job can check before loading or embedding anything.

What is checked, per scorer family:

- gradient scorers (``grad-dot``, ``grad-cos``, ``kfac``, ``ekfac``, ``datainf``): the tracked
  layers ``find_layers`` gives for ``layers``/``modules``/``include_lm_head``/``include_bias``
  (non-Linear weights in the requested group, as Mixtral's 3-D experts, are a problem; patterns
  that match nothing too), and that the model has an input embedding module;
- ``predictor``: the same for its base scorer (``base``, default ``ekfac``) with the forwarded
  options;
- ``attention``: that every self-attention module has a layout whose heads it can mask;
- ``el2n``/``vog`` need only the per-example loss: any causal LM.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["check_compatible", "meta_model"]

_LAYER_OPTIONS = ("layers", "modules", "include_lm_head", "include_bias")


def meta_model(model_or_config: Any) -> nn.Module:
    """An ``nn.Module`` for ``model_or_config``; configs and paths are built on the meta device."""
    from .model import InfluenceModel

    if isinstance(model_or_config, InfluenceModel):
        return model_or_config.model
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    cfg = model_or_config
    if isinstance(cfg, (str, Path)):
        cfg = AutoConfig.from_pretrained(str(cfg))
    if not isinstance(cfg, PretrainedConfig):
        raise TypeError(f"expected a model, an InfluenceModel, a transformers config or a model path, "
                        f"got {type(model_or_config).__name__}")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def check_compatible(model_or_config: Any, scorer: str, **options: Any) -> list[str]:
    """Problems that stop ``scorer`` (with these scorer ``options``) on this model; [] if none."""
    from . import attention, datainf, predictor, trajectory  # noqa: F401 - register every scorer
    from .attention_heads import find_attention_sites
    from .base import available_scorers, scorer_class
    from .layers import find_layers
    from .scorers import GradientScorer

    cls = scorer_class(scorer)
    if cls is None:
        return [f"scorer {scorer!r} is unknown; available: {available_scorers()}"]
    try:
        model = meta_model(model_or_config)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return [f"cannot build the model to check it: {type(exc).__name__}: {exc}"]
    arch = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    prefix = f"scorer {scorer!r} on {arch}"
    problems: list[str] = []

    def gradient(opts: dict, who: str) -> None:
        if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
            problems.append(f"{who}: the model has no input embedding module (get_input_embeddings())")
        kw = {k: opts[k] for k in _LAYER_OPTIONS if opts.get(k) is not None}
        try:
            find_layers(model, kw.pop("layers", "all"), **kw)
        except (ValueError, TypeError) as exc:
            problems.append(f"{who}: {exc}")

    if issubclass(cls, GradientScorer):
        gradient(options, prefix)
    elif scorer == "predictor":
        base = options.get("base", "ekfac")
        base_opts = dict(options.get("base_options") or {})
        for k in ("layers", "modules"):
            if k in options and k not in base_opts:
                base_opts[k] = options[k]
        base_cls = scorer_class(base)
        if base_cls is not None and issubclass(base_cls, GradientScorer):
            gradient(base_opts, f"{prefix} (base {base!r})")
        elif base_cls is not None and base != "predictor":
            problems += check_compatible(model, base, **base_opts)
    elif scorer == "attention":
        try:
            find_attention_sites(model)
        except NotImplementedError as exc:
            problems.append(f"{prefix}: {exc}")
    return problems
