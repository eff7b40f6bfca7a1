"""The up-front checks of a job: every problem a user can cause from the config and the inputs,
found before the first expensive stage and reported together in one message.

Two rounds, because the second needs the pool's valid row count:

* :func:`config_problems` — before anything is written: input paths (and that the run directory
  is not where they are), the model folder and its weights, the device, the scorer's name and
  options, the reference a scorer needs, the Ray settings.
* :func:`pool_problems` — right after the sources are read (the first stage, and the only one
  that must run to know the pool): rows against ``cluster.k``, the budget and the bandit's
  constants.

``quadsel config --check job.yaml`` runs both (counting the pool's valid rows without writing
anything). Each problem is one line naming the field or file; :class:`PreflightError` joins them.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .config import JobConfig
from .layout import RunLayout
from .stages import MODEL_EMBEDDERS, JobError

logger = logging.getLogger(__name__)


class PreflightError(JobError):
    """One or more problems with a job found before it runs; the message lists them all."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        if len(problems) == 1:
            msg = problems[0]
        else:
            msg = f"{len(problems)} problems found before running:\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__(msg)


def raise_if(problems: list[str]) -> None:
    if problems:
        raise PreflightError(problems)


def uses_model(cfg: JobConfig, command: str = "run") -> bool:
    """Whether the job loads (or trains) a language model."""
    embed_model = cfg.embed.kind in MODEL_EMBEDDERS and cfg.embed.model is None
    if command != "run":
        return embed_model
    return cfg.selection.method != "random" or cfg.selection.budget.unit == "tokens" or embed_model


def _inside(child: Path, parent: Path) -> bool:
    c, p = Path(os.path.realpath(child)), Path(os.path.realpath(parent))
    return c == p or p in c.parents


def _path_problems(cfg: JobConfig) -> list[str]:
    from quadsel.pipeline.sources import SourceError, resolve_paths

    out = []
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        out.append(f"run_dir: {run_dir} exists and is not a folder")
    for name, src in (("pool", cfg.pool), ("reference", cfg.reference)):
        if src is None:
            continue
        specs = [src.path] if isinstance(src.path, str) else list(src.path)
        inside = [s for s in specs if Path(os.path.expanduser(s)).exists()
                  and _inside(Path(os.path.expanduser(s)), run_dir)]
        if inside:
            out.append(f"{name}.path: {inside[0]!r} is inside run_dir {str(run_dir)!r}: the run would read "
                       "its own output; give the job another run_dir")
            continue
        try:
            resolve_paths(src, exclude=[run_dir])
        except SourceError as e:
            out.append(f"{name}.path: {e}")
    return out


def device_problem(device: str, field: str = "model.device") -> str | None:
    """Why ``device`` cannot be used on this machine (None if it can)."""
    if device == "auto":
        return None
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return f"{field}: {device!r} is not a device (use auto, cpu, cuda, cuda:N or mps)"
    if d.type == "cuda":
        if not torch.cuda.is_available():
            return (f"{field}: {device!r} but this machine has no usable CUDA device "
                    "(torch.cuda.is_available() is False); use auto or cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            return f"{field}: {device!r} but this machine has {torch.cuda.device_count()} CUDA device(s)"
    elif d.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            return f"{field}: 'mps' is not available on this machine; use auto or cpu"
    elif d.type != "cpu":
        return f"{field}: {device!r}: quadsel runs models on cpu, cuda or mps"
    return None


def _safetensors_problem(f: Path) -> str | None:
    """A truncated or corrupt .safetensors file, found from its header alone (no tensors read)."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return f"{f}: truncated ({size} bytes)"
            n = struct.unpack("<Q", raw)[0]
            if n > min(size - 8, 100 * 2**20):
                return f"{f}: corrupt safetensors header (says {n:,} header bytes; the file has {size:,})"
            header = json.loads(fh.read(n))
    except OSError as e:
        return f"{f}: unreadable ({e.strerror or e})"
    except (ValueError, UnicodeDecodeError):
        return f"{f}: corrupt safetensors header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and "data_offsets" in v]
    need = 8 + n + max(ends, default=0)
    if need > size:
        return f"{f}: truncated ({size:,} bytes, its header needs {need:,}); copy the model again"
    return None


def model_folder_problems(path: str, field: str = "model.path") -> list[str]:
    """A local model folder that cannot be a model: not a folder, no config.json, bad weights."""
    p = Path(os.path.expanduser(path))
    if not p.exists():
        return []  # a hub id (or a missing path: check_model_path names it)
    if not p.is_dir():
        return [f"{field}: {path!r} is a file; give the model's folder (with config.json)"]
    if not os.access(p, os.R_OK | os.X_OK):
        return [f"{field}: cannot read the folder {path!r} (permission denied)"]
    cfg_file = p / "config.json"
    if not cfg_file.is_file() and not (p / "adapter_config.json").is_file():
        return [f"{field}: cannot load a causal LM from {path!r}: the folder has no config.json "
                "(nor adapter_config.json of a peft adapter)"]
    out = []
    for meta in (cfg_file, p / "adapter_config.json"):
        if meta.is_file():
            try:
                json.loads(meta.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                out.append(f"{field}: {meta} is not valid JSON ({e})")
    for f in sorted(p.glob("*.safetensors")):
        why = _safetensors_problem(f)
        if why:
            out.append(f"{field}: {why}")
    return out


def config_problems(cfg: JobConfig, command: str = "run") -> list[str]:
    """Every problem found from the config and the input paths alone (nothing is read or written)."""
    from .models import check_model_path, scorer_class, scorer_kwargs

    out = _path_problems(cfg)
    if cfg.ray.address and not cfg.ray.enabled and command == "run":
        out.append(f"ray.address is {cfg.ray.address!r} (--address) but ray.enabled is false (--no-ray): "
                   "give one of them")
    if uses_model(cfg, command):
        if cfg.model.path is not None:
            try:
                check_model_path(cfg.model)
            except JobError as e:
                out.append(str(e))
            else:
                out += model_folder_problems(cfg.model.path)
        why = device_problem(cfg.model.device)
        if why:
            out.append(why)
    if cfg.embed.kind in ("hf", *MODEL_EMBEDDERS):
        why = device_problem(cfg.embed.device, "embed.device")
        if why:
            out.append(why)
        if cfg.embed.model:
            out += model_folder_problems(cfg.embed.model, "embed.model")
    if (command == "run" and cfg.ray.enabled and cfg.ray.address is None and cfg.selection.method != "random"
            and cfg.ray.num_cpus_per_actor > (os.cpu_count() or 1)):
        out.append(f"ray.num_cpus_per_actor = {cfg.ray.num_cpus_per_actor:g} but this machine has "
                   f"{os.cpu_count()} CPUs (Ray is started locally): no actor could ever be placed")
    if command == "cluster":
        why = selection_clash(cfg)
        if why:
            out.append(why)
    if command == "run" and cfg.selection.method != "random":
        try:
            kwargs = scorer_kwargs(cfg.scorer, cfg.seed)
            if cfg.model.path is not None and not any(p.startswith("model.path") for p in out):
                out += _compatibility_problems(cfg, kwargs)
            if cfg.reference is None and scorer_class(cfg.scorer).needs_reference:
                out.append(f"reference: the {cfg.scorer.name!r} scorer needs a reference set (set "
                           "reference.path), or use selection.method=random or a scorer without one "
                           "(attention, vog, el2n)")
        except JobError as e:
            out.append(str(e))
    return out


def _differences(old: Any, new: Any, where: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            _differences(old.get(k), new.get(k), f"{where}.{k}", out)
    elif old != new:
        out.append(f"{where} = {new!r} (the selection's: {old!r})")


def selection_clash(cfg: JobConfig) -> str | None:
    """``quadsel cluster`` into a run directory that holds a finished selection made with other
    clustering settings (pool, embed, cluster, the seed they take, the model a model-based
    embedder uses): why it is refused, or None. Its ``clusters/`` tables and cached stages
    describe the selection's shards; replacing them would make ``inspect`` and ``report``
    disagree with the shards."""
    from .config import ConfigError, load_config

    run_dir = Path(cfg.run_dir)
    made_path = RunLayout(run_dir).config_resolved
    if not RunLayout(run_dir).manifest.is_file() or not made_path.is_file():
        return None
    try:
        made = load_config(made_path)
    except (ConfigError, OSError):  # unreadable: the clustering's result is compared instead
        return None
    sections = ["pool", "embed", "cluster"]
    if cfg.embed.seed is None or cfg.cluster.seed is None:
        sections.append("seed")
    if cfg.embed.kind in MODEL_EMBEDDERS and cfg.embed.model is None:
        sections.append("model")
    was, now = made.model_dump(mode="json"), cfg.model_dump(mode="json")
    diffs: list[str] = []
    for name in sections:
        _differences(was.get(name), now.get(name), name, diffs)
    if not diffs:
        return None
    shown = "; ".join(diffs[:3]) + (f"; {len(diffs) - 3} more" if len(diffs) > 3 else "")
    return (f"run_dir: {run_dir} holds a finished selection whose clusters/ and cached stages describe its "
            f"shards, made with other clustering settings ({shown}); `quadsel cluster` there would replace "
            "them while the shards keep the old clusters: give this clustering its own run directory "
            "(--run-dir DIR), or make a new selection with these settings (`quadsel run`)")


def _compatibility_problems(cfg: JobConfig, kwargs: dict[str, Any]) -> list[str]:
    """What stops the scorer on ``model.path``'s architecture (from its config alone, no weights
    loaded). A model that cannot even be built here to check (e.g. a hub id that needs remote
    code) is left to the run, with a warning."""
    from quadsel.influence import check_compatible

    found = check_compatible(cfg.model.path, cfg.scorer.name, **kwargs)
    unknown = [p for p in found if p.startswith("cannot build the model")]
    for p in unknown:
        logger.warning("model.path: %s; the scorer's compatibility is checked when the model loads", p)
    return [f"scorer: {p}" for p in found if p not in unknown]


def pool_problems(cfg: JobConfig, n_rows: int, command: str = "run") -> list[str]:
    """Problems of the pool's size against the job: k, the budget and the bandit's constants."""
    out = []
    k = cfg.cluster.k
    if n_rows < 2:
        out.append(f"pool: {n_rows} valid row(s); clustering and selection need at least 2 "
                   "(see rejects.jsonl for the rows left out)")
    if k > n_rows:
        out.append(f"cluster.k = {k} is larger than the pool ({n_rows} valid rows); set cluster.k to at most "
                   f"{n_rows}")
    if command != "run":
        return out
    b = cfg.selection.budget
    if b.amount is not None and b.unit == "examples" and b.amount > n_rows:
        out.append(f"selection.budget.amount = {b.amount:,} examples is more than the pool holds ({n_rows:,} "
                   f"valid rows, see rejects.jsonl for the rows left out); set selection.budget.amount to at "
                   f"most {n_rows:,} or use selection.budget.fraction")
    if cfg.selection.method == "quad" and b.unit == "examples" and not out:
        from quadsel.selection import Budget, QuadConfig

        amount = b.amount if b.amount is not None else max(1, int(round(b.fraction * n_rows)))
        try:
            QuadConfig.scaled(n_rows, k, Budget(unit="examples", amount=amount), **cfg.selection.quad)
        except ValidationError as e:
            out.append("selection.quad: " + "; ".join(
                f"{'.'.join(map(str, x['loc'])) + ': ' if x['loc'] else ''}{x['msg'].removeprefix('Value error, ')}"
                for x in e.errors()))
        except (TypeError, ValueError) as e:
            out.append(f"selection.quad: {e}")
    return out


def count_valid_rows(cfg: JobConfig, name: str, features=None) -> tuple[int, dict[str, Any]]:
    """Valid rows of the pool (or reference) and the reject summary, reading without writing;
    ``features`` (a tf-idf ``FeatureCounter``), when given, sees every valid text."""
    from quadsel.pipeline.sources import RejectLog, iter_examples

    src = cfg.pool if name == "pool" else cfg.reference
    rejects = RejectLog(None)
    n = 0
    for ex in iter_examples(src, rejects, exclude=[cfg.run_dir]):
        n += 1
        if features is not None:
            features.add(ex.text)
    return n, rejects.summary()


def check_job(cfg: JobConfig, command: str = "run") -> dict[str, Any]:
    """``quadsel config --check``: every check, with the pool read (and counted) but nothing run
    or written. Raises PreflightError listing every problem; returns what was found otherwise."""
    problems = config_problems(cfg, command)
    found: dict[str, Any] = {}
    if not any(p.startswith(("pool.path", "run_dir")) for p in problems):
        from quadsel.pipeline.sources import SourceError

        for name in ("pool", "reference"):
            if name == "reference" and (cfg.reference is None or any(p.startswith("reference.path")
                                                                     for p in problems)):
                continue
            features = None
            if name == "pool" and cfg.embed.kind == "tfidf":  # what the embed fit will find
                from quadsel.pipeline.embed.tfidf import FeatureCounter

                features = FeatureCounter(cfg.embed)
            try:
                n, rej = count_valid_rows(cfg, name, features)
            except SourceError as e:
                problems.append(f"{name}: {e}")
                continue
            found[name] = {"rows": n, "rejected": rej["total"], "reject_counts": rej["counts"],
                           "files": len(rej["files"])}
            if name == "pool":
                problems += pool_problems(cfg, n, command)
                why = features.problem() if features is not None else None
                if why:
                    problems.append(why)
            elif n == 0:
                problems.append(f"reference: no valid rows in {cfg.reference.path!r} ({rej['counts']})")
    raise_if(problems)
    return found
