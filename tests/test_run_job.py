"""`quadsel run` end to end on a small embedded corpus: outputs, caching, resume, Ray."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import small_job

from quadsel.jobs.config import JobConfig
from quadsel.jobs.run_job import run_selection
from quadsel.pipeline.shards import data_files, read_manifest, verify


def _cfg(root: Path, **over) -> JobConfig:
    return JobConfig.model_validate(small_job(root, relative=True, **over))


def _outputs(run_dir: Path) -> dict[str, bytes]:
    files = ["manifest.json", *[str(Path(f).relative_to(run_dir)) for f in data_files(run_dir)]]
    return {f: (run_dir / f).read_bytes() for f in files}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # jobs use paths relative to their folder


def _run_in(root: Path, **over) -> tuple[Path, dict]:
    """Run the small job in ``root`` (relative paths) and return its absolute run dir."""
    import os

    old = os.getcwd()
    os.chdir(root)
    try:
        summary = run_selection(_cfg(root, **over))
    finally:
        os.chdir(old)
    return root / "run", summary


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("run")
    small_job(root)  # builds the corpus
    return _run_in(root)


def test_run_writes_the_documented_layout(finished):
    run_dir, summary = finished
    for rel in ("config.resolved.yaml", "manifest.json", "clusters/summary.parquet", "bandit/state.json",
                "bandit/probes.parquet", "bandit/selected.parquet", "rejects.jsonl", "summary.json",
                "stages/sources/_DONE.json", "stages/embed/_DONE.json", "stages/cluster/_DONE.json",
                "stages/proxy/_DONE.json", "stages/scorer/_DONE.json"):
        assert (run_dir / rel).exists(), rel
    log = [json.loads(line) for line in (run_dir / "logs" / "run.jsonl").read_text().splitlines()]
    assert any("selected" in r["msg"] or "wrote" in r["msg"] for r in log) and all("ts" in r for r in log)
    verify(run_dir)
    man = read_manifest(run_dir)
    assert man["total_rows"] == summary["selected"] == 60  # the budget, exactly
    assert summary["budget_met"] and summary["scorer_calls"] < summary["pool_rows"]
    table = pq.read_table(run_dir / "clusters" / "summary.parquet")
    for col in ("size", "pulls", "mean_reward", "cs", "selected", "neighbours", "representative_ids"):
        assert col in table.column_names
    assert sum(table.column("selected").to_pylist()) == 60


def test_shards_load_with_datasets_and_keep_original_columns(finished):
    from datasets import load_dataset

    run_dir, _ = finished
    ds = load_dataset("arrow", data_files=data_files(run_dir), split="train")
    assert len(ds) == 60
    assert {"id", "text", "domain", "quadsel_cluster", "quadsel_score", "quadsel_round"} <= set(ds.column_names)
    scored = [s for s in ds["quadsel_score"] if s is not None]
    assert scored and all(np.isfinite(scored))
    assert len(set(ds["id"])) == 60


def test_rerun_reuses_every_stage_and_changes_nothing(finished, caplog):
    run_dir, summary = finished
    before = _outputs(run_dir)
    with caplog.at_level("INFO", logger="quadsel"):
        _, again = _run_in(run_dir.parent)
    assert again["selected"] == summary["selected"]
    text = caplog.text
    for stage in ("embed: reusing", "cluster: reusing", "proxy model: reusing", "scorer: reusing"):
        assert stage in text, stage
    assert _outputs(run_dir) == before


def test_a_new_reference_reuses_the_fitted_curvature(finished, tmp_path, monkeypatch):
    """The curvature is fitted on a pool sample: a rerun that changes only the reference keeps
    it (no second fit) and recomputes the reference side, giving what a fresh run gives."""
    import json as _json

    from quadsel.influence.curvature import EKFAC

    run_dir, _ = finished
    root = tmp_path / "rerun"
    shutil.copytree(run_dir.parent / "data", root / "data")
    _run_in(root)  # here: the sources stage's key has the input files' paths and inodes
    lines = (root / "data" / "reference.jsonl").read_text().splitlines()
    (root / "data" / "reference.jsonl").write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    done = root / "run" / "stages" / "curvature" / "_DONE.json"
    curvature_before = done.read_bytes()
    scorer_before = (root / "run" / "stages" / "scorer" / "_DONE.json").read_bytes()

    fits = []
    real_fit = EKFAC.fit
    monkeypatch.setattr(EKFAC, "fit", lambda self, *a, **k: fits.append(1) or real_fit(self, *a, **k))
    _, summary = _run_in(root)
    assert fits == []  # the factors were not fitted again
    assert done.read_bytes() == curvature_before
    assert (root / "run" / "stages" / "scorer" / "_DONE.json").read_bytes() != scorer_before

    fresh = tmp_path / "fresh"
    shutil.copytree(root / "data", fresh / "data")
    _, fresh_summary = _run_in(fresh)
    assert fits  # a fresh run does fit
    assert _outputs(root / "run") == _outputs(fresh / "run")
    assert _json.loads((root / "run" / "stages" / "scorer" / "_DONE.json").read_text())["info"]["fit_rows"] == 24


def test_resume_after_a_kill_gives_identical_shards(finished, tmp_path):
    run_dir, summary = finished
    reference = _outputs(run_dir)
    assert summary["rounds"] >= 2
    for k in sorted({1, summary["rounds"] - 1}):  # after the first round, and before the last
        root = tmp_path / f"k{k}"
        shutil.copytree(run_dir.parent / "data", root / "data")
        import os

        os.chdir(root)
        cfg = _cfg(root)
        stopped = run_selection(cfg, stop_after_round=k)
        assert stopped == {"stopped_after_round": k}
        state = json.loads((root / "run" / "bandit" / "state.json").read_text())
        assert state["round"] == k
        assert not (root / "run" / "manifest.json").exists()
        run_selection(cfg)  # resumes from round k
        assert _outputs(root / "run") == reference


def test_ray_actor_pool_gives_the_same_selection(finished, tmp_path):
    run_dir, _ = finished
    shutil.copytree(run_dir.parent / "data", tmp_path / "data")
    out, _ = _run_in(tmp_path, ray=True)
    ours, theirs = _outputs(out), _outputs(run_dir)
    assert ours.pop("manifest.json") != theirs.pop("manifest.json")  # config differs: ray.enabled
    assert ours == theirs  # shards byte-identical
    assert read_manifest(out)["shards"] == read_manifest(run_dir)["shards"]


@pytest.mark.parametrize("method", ["random", "topk", "cluster-topk"])
def test_baselines_run_end_to_end(method, finished, tmp_path):
    run_dir, _ = finished
    shutil.copytree(run_dir.parent / "data", tmp_path / "data")
    _, summary = _run_in(tmp_path, method=method)
    assert summary["selected"] == 60
    expected_calls = 0 if method == "random" else summary["pool_rows"]
    assert summary["scorer_calls"] == expected_calls


@pytest.mark.parametrize("kind", ["hidden", "gradient"])
def test_model_embedders_cluster_the_proxy_models_view(kind, finished, tmp_path):
    """embed.kind hidden/gradient: the job trains the proxy first and clusters its features."""
    run_dir, _ = finished
    shutil.copytree(run_dir.parent / "data", tmp_path / "data")
    out, summary = _run_in(tmp_path, **{"embed.kind": kind, "embed.projection_dim": 64,
                                        "embed.whiten.enabled": kind == "hidden"})
    assert summary["selected"] == 60
    info = json.loads((out / "stages" / "embed" / "_DONE.json").read_text())["info"]
    assert info["kind"] == kind and info["whitened"] == (kind == "hidden")
    assert not list((out / "stages").glob("embed.work-*"))  # moved into the stage, nothing left over
    verify(out)


@pytest.mark.parametrize("scorer, over", [
    ("datainf", {}),
    ("el2n", {"reference": None}),             # needs no reference set
    ("attention", {"scorer.options": {"head_fraction": 0.25}}),
    ("predictor", {"scorer.options": {"label_sample": 24, "base": "grad-dot"}}),
    ("vog", {"model.proxy.checkpoints": 2}),
])
def test_other_scorers_drive_the_bandit(scorer, over, finished, tmp_path):
    """Every registered scorer works as the bandit's scorer in `quadsel run`; checkpoint scorers
    make the job save proxy checkpoints; scorers without a reference run without one."""
    run_dir, _ = finished
    shutil.copytree(run_dir.parent / "data", tmp_path / "data")
    cfg = small_job(tmp_path, relative=True, **{"scorer.name": scorer}, **over)
    summary = run_selection(JobConfig.model_validate(cfg))
    out = tmp_path / "run"
    assert summary["selected"] == 60 and 0 < summary["scorer_calls"] <= 0.1 * summary["pool_rows"]
    assert summary["scorer"]["name"] == scorer
    if scorer == "predictor":  # the held-out check of the regressor against its base's scores
        assert -1 <= summary["scorer"]["report"]["holdout_spearman"] <= 1
    verify(out)
    scores = pq.read_table(out / "bandit" / "probes.parquet").column("score").to_numpy()
    assert np.isfinite(scores).all() and np.unique(scores).size > 1
    ckpts = sorted((out / "stages" / "proxy" / "model" / "checkpoints").glob("step_*"))
    if scorer in ("el2n", "vog"):
        assert len(ckpts) == (2 if scorer == "vog" else 3)
        meta = json.loads((out / "stages" / "scorer" / "scorer" / "scorer.json").read_text())
        assert len(meta["config"]["checkpoints"]) == len(ckpts) + 1  # + the final model
    else:
        assert not ckpts  # only checkpoint scorers make the job save them


def test_the_run_object_steps_reuse_the_job_and_take_an_injected_score_function(finished, tmp_path, monkeypatch):
    """``SelectionRun``: the job's steps one by one (what the quality benchmark drives). On a copy
    of a finished run every step reuses its stage; ``select`` with an injected score function
    (here the job's own row scorer, counted) gives the job's selection; ``selection`` / ``seed``
    override the job's for one selector."""
    from quadsel.jobs.config import SelectionConfig
    from quadsel.jobs.selection_run import SelectionRun

    run_dir, summary = finished
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    monkeypatch.chdir(run_dir.parent)  # the same input files: the sources stage's key is kept
    cfg = JobConfig.model_validate(dict(small_job(run_dir.parent, relative=True), run_dir=str(copy)))
    run = SelectionRun(cfg)
    built = []
    monkeypatch.setattr("quadsel.influence.build_proxy_model", lambda *a, **k: built.append(1))
    assert len(run.pool()) == summary["pool_rows"] and run.model_dir() is not None and built == []
    assert len(run.clusters().centroids) == summary["clusters"]
    assert run.scorer_dir() == copy / "stages" / "scorer" / "scorer"
    asked: list[int] = []
    with run.row_scorer() as job_scores:
        def score_fn(rows):
            asked.append(len(rows))
            return job_scores(rows)
        sel, result = run.select(score_fn)
    expected = pq.read_table(run_dir / "bandit" / "selected.parquet")
    assert list(result.rows) == expected.column("row").to_pylist()
    assert sum(asked) == sel.scorer_calls == run.scoring["scored"] > 0
    other = SelectionConfig(method="random", budget={"unit": "examples", "amount": 10})
    sel2, picked = run.select(selection=other, seed=7)
    assert len(picked.rows) == 10 and sel2.scorer_calls == 0
    _, again = run.select(selection=other, seed=7)
    assert list(again.rows) == list(picked.rows)
    view, budget, _ = run.selector_parts(other)
    assert budget.amount == 10 and sum(len(m) for m in view.members) == summary["pool_rows"]


def test_a_rounds_rows_are_scored_in_length_sorted_batches(tmp_path):
    """The job hands the executor a round's texts longest first, so each chunk (one padded
    batch) holds rows of similar length; the scores come back in the rows' own order and equal
    the scorer's own, row by row."""
    from quadsel.influence import make_scorer
    from quadsel.influence.testing import random_texts, tiny_influence_model
    from quadsel.jobs.selection_run import _score_rows_fn
    from quadsel.pipeline.ray_runtime import LocalPool
    from quadsel.pipeline.sources import Example
    from quadsel.pipeline.store import PoolStore

    texts = random_texts(23, seed=5, min_words=1, max_words=40)
    im = tiny_influence_model("llama", max_length=32, batch_size=4)
    scorer = make_scorer("ekfac", im).fit(texts[:6]).set_reference(texts[6:9])
    batches: list[list[int]] = []

    class Recording:  # the real scorer, with the batches it was handed recorded
        def score(self, chunk):
            batches.append([len(t) for t in chunk])
            return scorer.score(chunk)

    pool = PoolStore.write([[Example(id=f"r{i}", text=t, meta={}, source="mem", line=i + 1)
                             for i, t in enumerate(texts)]], tmp_path / "pool")
    rows = np.array([3, 17, 0, 22, 9, 4, 11, 20, 1, 15], dtype=np.int64)
    counter = {"scored": 0.0, "seconds": 0.0}
    got = _score_rows_fn(pool, LocalPool(Recording, chunk_size=4), counter)(rows)
    handed = [n for b in batches for n in b]
    assert handed == sorted((len(texts[r]) for r in rows), reverse=True)
    assert len(set(map(len, map(str.split, (texts[r] for r in rows))))) > 3  # lengths do differ
    want = scorer.score([texts[r] for r in rows]).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert counter["scored"] == len(rows)
