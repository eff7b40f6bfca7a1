from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(os.environ.get("QUADSEL_BENCH_DATA", REPO.parent / "shared" / "data" / "bench"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


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
