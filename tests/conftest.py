from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(os.environ.get("QUADSEL_BENCH_DATA", REPO.parent / "shared" / "data" / "bench"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# datasets' cache is keyed by file paths, and pytest reuses its temp paths across sessions: a
# cache of its own per session, so a test never reads another session's cached table
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="quadsel-tests-hf-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bench_dir() -> Path:
    if not (BENCH / "pool.jsonl").is_file():
        pytest.skip(f"benchmark data not found at {BENCH}")
    return BENCH


@pytest.fixture(scope="session")
def pool_sample(bench_dir) -> list[dict]:
    """Every 10th document of the real benchmark pool (about 1,950 rows), domain kept."""
    import json

    rows = []
    with open(bench_dir / "pool.jsonl", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i % 10 == 0:
                rows.append(json.loads(line))
    return rows


def small_job(root: Path, *, method: str = "quad", ray: bool = False, relative: bool = False, **over) -> dict:
    """A complete, fast job config on a small embedded corpus (seconds on CPU).

    ``relative=True`` writes paths relative to ``root`` (run from there), so that two copies of
    the same job in different folders have the same config.
    """
    from quadsel.pipeline.demo import build_demo_corpus

    data = root / "data"
    if not (data / "pool.jsonl").is_file():
        build_demo_corpus(data, seed=0, n_code=160, n_docstring=120, n_spam=40, n_garbage=30,
                          n_duplicate=20, reference_topics=3, max_reference=24)
    cfg = {
        "run_dir": str(root / "run"),
        "seed": 0,
        "pool": {"path": str(data / "pool.jsonl"), "max_chars": 1500},
        "reference": {"path": str(data / "reference.jsonl"), "max_chars": 1500},
        "embed": {"kind": "tfidf", "dim": 32, "fit_sample": 2000},
        "cluster": {"k": 12, "niter": 10},
        "model": {"max_length": 64, "batch_size": 8,
                  "proxy": {"train_sample": 200, "vocab_size": 512, "hidden_size": 32, "num_layers": 1,
                            "num_heads": 2, "steps": 20, "batch_size": 8}},
        "scorer": {"name": "ekfac", "fit_sample": 24},
        "selection": {"method": method, "budget": {"unit": "examples", "amount": 60},
                      "quad": {"arms_per_round": 3}},
        "ray": {"enabled": ray, "num_actors": 2},
    }
    for key, value in over.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    if relative:
        cfg["run_dir"] = "run"
        cfg["pool"]["path"] = "data/pool.jsonl"
        if cfg.get("reference") is not None:  # a job may run without one
            cfg["reference"]["path"] = "data/reference.jsonl"
    return cfg


@pytest.fixture(autouse=True)
def _restore_quadsel_logging():
    """CLI tests call configure_logging (own handlers, no propagation); undo it after each test
    so later tests' caplog sees quadsel's records whatever the test order."""
    import logging

    from quadsel.core import progress

    yield
    log = logging.getLogger("quadsel")
    for h in list(log.handlers):
        log.removeHandler(h)
    log.propagate = True
    log.setLevel(logging.NOTSET)
    progress._settings.mode = "auto"


@pytest.fixture
def quadsel_log(caplog):
    """caplog on the ``quadsel`` logger, WARNING and up, also when it does not propagate (after
    configure_logging); ``quadsel_log.set_level(...)`` to capture more."""
    import logging

    lg = logging.getLogger("quadsel")
    lg.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="quadsel")
    yield caplog
    lg.removeHandler(caplog.handler)
