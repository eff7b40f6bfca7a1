"""What `quadsel run` hands a trainer: shards in a seeded shuffled order, a run directory that
`datasets.load_dataset` reads as exactly the selection."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import small_job

from quadsel.jobs.config import JobConfig
from quadsel.jobs.run_job import run_selection
from quadsel.pipeline.shards import data_files, write_order


def _shards(run_dir) -> pa.Table:
    return pa.concat_tables([pa.ipc.open_file(f).read_all() for f in data_files(run_dir)])


def _run(root, **over):
    cfg = JobConfig.model_validate(small_job(root, method="random", **over))
    run_selection(cfg)
    return root / "run"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("out")
    small_job(root)  # builds the corpus once
    shuffled = _run(root, **{"output.max_rows": 25})
    plain_root = tmp_path_factory.mktemp("plain")
    import shutil

    shutil.copytree(root / "data", plain_root / "data")
    plain = _run(plain_root, **{"output.max_rows": 25, "output.shuffle": False})
    return shuffled, plain


def test_shards_are_in_the_seeded_shuffled_order(runs):
    shuffled, plain = runs
    sel = pq.read_table(shuffled / "bandit" / "selected.parquet")  # the selector's order
    rows = np.asarray(sel.column("row"))
    order = write_order(rows, 0)  # small_job's seed
    got = _shards(shuffled)
    assert got.num_rows == len(rows) == 60 and len(data_files(shuffled)) == 3
    assert got.column("quadsel_cluster").to_pylist() == np.asarray(sel.column("cluster"))[order].tolist()
    assert got.column("quadsel_round").to_pylist() == np.asarray(sel.column("round"))[order].tolist()
    # output.shuffle=false keeps the selector's order
    ref = _shards(plain)
    assert ref.column("quadsel_cluster").to_pylist() == sel.column("cluster").to_pylist()
    assert sorted(ref.column("id").to_pylist()) == sorted(got.column("id").to_pylist())
    assert ref.column("id").to_pylist() != got.column("id").to_pylist()
    ids = ref.column("id").to_pylist()
    assert got.column("id").to_pylist() == [ids[i] for i in order]


def test_load_dataset_on_the_run_dir(runs, tmp_path):
    import datasets

    shuffled, _ = runs
    ds = datasets.load_dataset(str(shuffled), split="train", cache_dir=str(tmp_path / "c"))
    assert ds.to_list() == _shards(shuffled).to_pylist()  # exactly the selection, in order
