"""Job configuration: one YAML file, validated by pydantic, with ``--set key=value`` overrides.

Each stage owns its own config model (``pipeline.sources.SourceConfig``,
``pipeline.embed.EmbedConfig`` …); this module only composes them. Unknown keys and wrong types
are errors that name the field and say what was expected.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quadsel.core.errors import ConfigError
from quadsel.pipeline.cluster import ClusterConfig
from quadsel.pipeline.embed import EmbedConfig
from quadsel.pipeline.shards import ShardConfig
from quadsel.pipeline.sources import SourceConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ProxyConfig(_Strict):
    """The tiny proxy LM trained on the spot when no model is given."""

    train_sample: int = Field(3000, gt=0, description="pool rows the proxy is trained on")
    vocab_size: int = Field(4096, gt=256)
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    steps: int = Field(300, ge=1)
    train_length: int = Field(128, gt=1, description="tokens per training sequence (<= model.max_length)")
    batch_size: int = Field(16, gt=0)
    lr: float = Field(3e-3, gt=0)
    checkpoints: int | None = Field(None, ge=0, description="intermediate checkpoints saved in "
                                    "<model>/checkpoints (read by vog / el2n); null: 3 when the "
                                    "scorer needs them, else 0")

    @model_validator(mode="after")
    def _check(self) -> "ProxyConfig":
        if self.checkpoints is not None and self.checkpoints >= self.steps:
            raise ValueError(f"checkpoints ({self.checkpoints}) must be fewer than steps ({self.steps})")
        return self


DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                 "float": "float32"}


class ModelConfig(_Strict):
    path: str | None = Field(None, description="HF model id or local path; null (or empty) = train a proxy")
    max_length: int = Field(256, gt=1)
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="also bf16, fp16, half, fp32")
    batch_size: int = Field(16, gt=0)
    proxy: ProxyConfig = ProxyConfig()

    @field_validator("path", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        if isinstance(v, str):
            if not v.strip():
                return None  # `--set model.path=` means no model: a proxy is trained
            if v.startswith("~"):
                return os.path.expanduser(v)
        return v

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, v: Any) -> Any:
        return DTYPE_ALIASES.get(v.lower(), v.lower()) if isinstance(v, str) else v


class ScorerConfig(_Strict):
    name: str = "ekfac"
    layers: Literal["attention", "mlp", "all"] = "all"
    modules: list[str] | None = Field(
        None, description="score only these modules: names or regular expressions of whole dotted module names "
                          "(e.g. '.*lora_[AB].*' for a peft model's LoRA adapters); none: every layer of `layers`")
    damping: float = Field(0.1, gt=0, description="absolute, or a multiple of the mean eigenvalue (relative)")
    damping_mode: Literal["absolute", "relative"] = "relative"
    projection_dim: int | None = Field(None, gt=0)
    fit_on: Literal["pool", "reference"] = "pool"
    fit_sample: int = Field(256, gt=0, description="texts the curvature is fitted on")
    options: dict[str, Any] = Field(default_factory=dict, description="scorer-specific extras")


class BudgetConfig(_Strict):
    unit: Literal["examples", "tokens"] = "examples"
    amount: int | None = Field(None, gt=0, description="absolute budget; or use fraction. More than the "
                               "pool holds (after rejects) is an error, not 'select everything'")
    fraction: float | None = Field(None, gt=0, le=1, description="share of the pool")

    @model_validator(mode="after")
    def _one_of(self) -> "BudgetConfig":
        if (self.amount is None) == (self.fraction is None):
            raise ValueError("give exactly one of budget.amount or budget.fraction")
        return self


class SelectionConfig(_Strict):
    method: Literal["quad", "random", "topk", "cluster-topk"] = "quad"
    budget: BudgetConfig = BudgetConfig(fraction=0.1)
    quad: dict[str, Any] = Field(default_factory=dict, description="selection.QuadConfig fields")

    @field_validator("quad")
    @classmethod
    def _quad_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        """Each key a QuadConfig field, each value valid for it on its own (the cross-field rules,
        e.g. take_size >= probe_size, are checked once the pool's scaled defaults are known)."""
        from pydantic import TypeAdapter
        from typing_extensions import Annotated

        from quadsel.selection import QuadConfig

        fields = QuadConfig.model_fields
        problems = []
        for key, value in v.items():
            if key not in fields:
                problems.append(f"unknown key {key!r} (QuadConfig fields: {', '.join(fields)})")
                continue
            f = fields[key]
            try:
                TypeAdapter(Annotated[f.annotation, f]).validate_python(value)
            except ValidationError as e:
                problems.append(f"{key}: {e.errors()[0]['msg']} (got {value!r})")
                continue
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{key}: must be a finite number (got {value!r})")
        if problems:
            raise ValueError("; ".join(problems))
        return v


class RayConfig(_Strict):
    enabled: bool = True
    address: str | None = Field(None, description="join an existing cluster; null = start locally")
    num_actors: int = Field(2, gt=0, description="scoring actors (one per GPU when GPUs exist)")
    num_cpus_per_actor: float = Field(1.0, gt=0)
    max_restarts: int = Field(3, ge=0)
    max_task_retries: int = Field(0, ge=0, description="Ray-level retries of a scoring task on its "
                                  "restarted actor; 0 lets quadsel resubmit the chunk to any live actor, "
                                  "which also copes with a node that is gone for good")


class JobConfig(_Strict):
    run_dir: str = "runs/quadsel"
    seed: int = Field(0, ge=0)
    pool: SourceConfig
    reference: SourceConfig | None = None
    embed: EmbedConfig = EmbedConfig()
    cluster: ClusterConfig = ClusterConfig()
    model: ModelConfig = ModelConfig()
    scorer: ScorerConfig = ScorerConfig()
    selection: SelectionConfig = SelectionConfig()
    ray: RayConfig = RayConfig()
    output: ShardConfig = ShardConfig()

    @field_validator("run_dir")
    @classmethod
    def _run_dir(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("run_dir must not be empty")
        return os.path.expanduser(v)

    @model_validator(mode="after")
    def _seeds(self) -> "JobConfig":
        """``seed`` is the seed of the whole run: the embed and cluster sections take it unless
        their own ``seed`` is set (every other stage derives its randomness from it already)."""
        bad = [f"{name}.seed" for name, sec in (("embed", self.embed), ("cluster", self.cluster))
               if isinstance(getattr(sec, "seed", 0), int) and getattr(sec, "seed", 0) < 0]
        if bad:
            raise ValueError(f"{', '.join(bad)}: seeds must be >= 0")
        for name in ("embed", "cluster"):
            sec = getattr(self, name)
            if "seed" not in sec.model_fields_set:
                object.__setattr__(self, name, sec.model_copy(update={"seed": self.seed}))
        return self


def _format_validation(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if not loc:  # a rule over several fields: its message names them
            lines.append(f"  {msg}")
            continue
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `quadsel config --defaults`)"
        got = e.get("input")
        got_s = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{got_s}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set has an empty key in {item!r}")
    try:
        # an empty value is null, as in YAML (`--set model.path=`: no model)
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


# keys of which a config gives exactly one: an override of one replaces the other from the file
_ONE_OF = {("selection", "budget"): ("amount", "fraction")}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    set_here: set[tuple[str, ...]] = set()
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:-1])} is not a section")
            node = nxt
        node[parts[-1]] = value
        set_here.add(tuple(parts))
        pair = _ONE_OF.get(tuple(parts[:-1]))
        if pair and parts[-1] in pair and value is not None:
            other = pair[1 - pair.index(parts[-1])]
            if (*parts[:-1], other) not in set_here:  # both given with --set: an error below
                node.pop(other, None)
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last)."""


def _mapping_no_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"{loader.name}: line {key_node.start_mark.line + 1}: key {key!r} is given twice "
                              f"(first on line {seen[key].start_mark.line + 1}); give each section and key once")
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_no_duplicates)


def _non_finite(obj: Any, path: str = "") -> list[str]:
    """Paths of NaN / infinite numbers anywhere in a config (no field means anything by them)."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [f"{path}: must be a finite number (got {obj!r})"]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in _non_finite(v, f"{path}[{i}]")]
    return []


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> JobConfig:
    """Read YAML (or start from ``base``), apply overrides, validate."""
    data: dict[str, Any] = dict(base or {})
    source = "overrides"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
            loader = _UniqueKeyLoader(text)
            loader.name = str(p)
            try:
                loaded = loader.get_single_data()
            finally:
                loader.dispose()
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{p}:{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not UTF-8 text") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        data.update(loaded)
    data = apply_overrides(data, overrides or [])
    try:
        cfg = JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, source)) from None
    bad = _non_finite(cfg.model_dump(mode="python"))
    if bad:
        raise ConfigError("\n".join([f"invalid config ({source}):", *(f"  {b}" for b in bad)]))
    return cfg


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def open_sections_reference() -> str:
    """YAML comments listing what ``selection.quad`` and ``scorer.options`` take: every field of
    the selectors' QuadConfig and every registered scorer's own options, with their defaults."""
    import dataclasses

    import quadsel.influence  # noqa: F401 - registers every scorer
    from quadsel.influence.base import available_scorers, scorer_class
    from quadsel.selection import QuadConfig

    common = set(ScorerConfig.model_fields) | {"seed"}
    lines = ["", "# selection.quad: any field of QuadConfig; those not set are scaled to the pool and the",
             "# budget (QuadConfig.scaled, see the README); the values below are the unscaled defaults."]
    for name, f in QuadConfig.model_fields.items():
        lines.append(f"#   {name}: {json.dumps(f.default)}  # {f.description or ''}".rstrip())
    lines += ["#", "# scorer.options: the chosen scorer's own options (the scorer.* fields above go to every",
              "# scorer that has them; anything else is an error), with their defaults:"]
    for name in available_scorers():
        cls = scorer_class(name)
        opts = {f.name: f.default for f in dataclasses.fields(cls.config_cls)
                if f.name in cls.option_names() - common and f.default is not dataclasses.MISSING}
        lines.append(f"#   {name}: {json.dumps(opts, default=str)}")
    return "\n".join(lines) + "\n"
