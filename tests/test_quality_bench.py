"""Smoke test of the selection-quality benchmark (bench.quality): the whole harness on a few
hundred real rows with tiny models (a target and its leave-domain-out variant, DSIR, both
evaluators). It checks the report's structure, not the quality claim. Plus unit tests of the
byte n-gram evaluator against a brute-force implementation."""
from __future__ import annotations

import json
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` is not an installed package

from bench.quality import make_config, run  # noqa: E402
from bench.quality.__main__ import main  # noqa: E402
from bench.quality.config import DEFAULT_METHODS, OTHER_SCORERS  # noqa: E402
from bench.quality.dsir import _unshard, take_to_budget  # noqa: E402
from bench.quality.ngram import BOUNDARY, ByteNgramLM, fit_and_evaluate  # noqa: E402
from bench.quality.stats import data_multiplier, paired  # noqa: E402


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def tiny_data(bench_dir, tmp_path_factory) -> Path:
    """~400 pool docs (every 48th, cut to 1,000 chars: DSIR filters docs under 100 words) and 3
    targets of 16 + 16 docs."""
    root = tmp_path_factory.mktemp("qdata")
    pool = []
    with open(bench_dir / "pool.jsonl", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i % 48 == 0:
                r = json.loads(line)
                r["text"] = r["text"][:1000]
                pool.append(r)
    _write(root / "pool.jsonl", pool)
    for t in ("gsm8k", "linux", "wikitext"):
        for split in ("reference", "eval"):
            rows = []
            with open(bench_dir / "targets" / t / f"{split}.jsonl", encoding="utf-8") as fh:
                for line in fh:
                    r = json.loads(line)
                    r["text"] = r["text"][:500]
                    rows.append(r)
                    if len(rows) == 16:
                        break
            _write(root / "targets" / t / f"{split}.jsonl", rows)
    return root


def test_whole_harness_tiny(tiny_data, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "results.md"
    rc = main(["--preset", "tiny", "--target", "gsm8k,gsm8k-ood", "--data-dir", str(tiny_data),
               "--cache-dir", str(cache), "--out", str(out), "--quiet-progress"])
    assert rc == 0
    cfg = make_config("tiny", data_dir=str(tiny_data), cache_dir=str(cache), targets=["gsm8k", "gsm8k-ood"])
    from bench.quality import load_summaries

    summaries = load_summaries(cfg)
    assert sorted(summaries) == ["gsm8k", "gsm8k-ood"]
    full, ood = summaries["gsm8k"], summaries["gsm8k-ood"]
    for s in (full, ood):
        assert s["seeds"] == [0, 1]
        assert set(s["methods"]) == set(DEFAULT_METHODS) and "dsir" in s["methods"]
        assert s["evaluators"] == ["neural", "ngram"]
        for m, r in s["rows"].items():
            for k in ("target_bpb", "mix_bpb", "target_loss", "mix_loss", "ng_target_bpb", "ng_mix_bpb"):
                assert len(r[k]["per_seed"]) == 2 and all(v > 0 for v in r[k]["per_seed"]), (m, k)
            for k in ("ng_target_bpb", "ng_mix_bpb"):  # below the uniform 8 bits per byte
                assert all(v < 8 for v in r[k]["per_seed"]), (m, k)
            if m != "random":
                for k in ("target_bpb_vs_random", "ng_target_bpb_vs_random"):
                    ci = r[k]
                    assert ci["lo"] <= ci["mean"] <= ci["hi"]
            sel = r["selection"]
            assert 0 <= sel["noise_share_tokens"] <= 1 and sel["cluster_entropy_nats"] >= 0
            assert sel["domain_mix_tokens"] and abs(sum(sel["domain_mix_tokens"].values()) - 1) < 0.02
            assert r["ngram"]["seconds"] is not None and r["ngram"]["train_bytes"] > 0
        # random never scores; topk scores the whole pool; quad scores part of it; DSIR weighs every row
        assert s["rows"]["random"]["selection"]["scorer_calls"] == 0
        assert s["rows"]["topk-ekfac"]["selection"]["scored_share"] == 1.0
        assert s["rows"]["dsir"]["selection"]["scored_share"] == 1.0
        assert 0 < s["rows"]["quad-ekfac"]["selection"]["scorer_calls"] <= s["pool_rows"]
        assert s["rows"]["quad-ekfac"]["selection"]["scoring_seconds_est"] is not None
        # a 2x / 4x budget holds about 2x / 4x the tokens; DSIR stays within the 1x budget
        used = {m: s["rows"][m]["selection"]["used_tokens"] for m in ("random", "random-2x", "random-4x", "dsir")}
        assert used["random"] < used["random-2x"] < used["random-4x"]
        budget = min(s["budget_tokens"].values())
        assert 0 < used["dsir"] <= budget
        # the n-gram LM (deterministic) gains from 4x more random data on the broad mix
        assert s["rows"]["random-4x"]["ng_mix_bpb"]["mean"] < s["rows"]["random"]["ng_mix_bpb"]["mean"]
        goal_keys = {"quad_beats_random_target", "quad_not_worse_random_mix", "quad_beats_dsir_target",
                     "quad_matches_random2x_target", "quad_scores_at_most_10pct"}
        assert set(s["goals"]) == {"neural", "ngram"}
        assert all(set(g) == goal_keys for g in s["goals"].values())
        assert set(s["validity"]) == {"neural", "ngram"}
    # DSIR with gsm8k's reference takes math far above its share of the pool
    assert full["rows"]["dsir"]["selection"]["target_domain_share_tokens"] > \
        2 * full["pool_mix"]["target_domain_share_tokens"] > 0
    # the leave-domain-out pool: no math row anywhere, fewer rows, its own cached stages
    assert full["excluded_domain"] is None and ood["excluded_domain"] == "math"
    assert ood["pool_rows"] < full["pool_rows"]
    assert "math" not in ood["pool_mix"]["domain_mix_tokens"]
    for r in ood["rows"].values():
        assert "math" not in r["selection"]["domain_mix_tokens"]
    assert (cache / "pool-no-math").is_dir() and list((cache / "pools").glob("pool-no-math-*.jsonl"))
    # the job's run folder per pool (its stages) and the LM training tokens: neither evicts the other
    for stage in ("pool/stages/proxy", "pool/stages/tokens", "stages/tokens-s0",
                  "pool-no-math/stages/proxy", "pool-no-math/stages/tokens", "stages/tokens-no-math-s0"):
        assert (cache / stage / "_DONE.json").is_file(), stage
    assert len(list((cache / "dsir").glob("weights-*.npz"))) == 2  # one per (pool, target)
    # random trainings of the two pools differ (their own proxy / tokens), broad mix eval the same sets
    assert ood["rows"]["random"]["mix_bpb"]["per_seed"] != full["rows"]["random"]["mix_bpb"]["per_seed"]
    assert set(ood["eval_sets"]) == set(full["eval_sets"]) == {"gsm8k", "linux", "wikitext"}
    text = out.read_text(encoding="utf-8")
    for needle in ("### Target `gsm8k`", "### Target `gsm8k-ood`", "Goals at a glance", "quad (ekfac)",
                   "random 4x budget", "DSIR (data-selection)", "Δ target vs random", "cluster entropy",
                   "Goals for `gsm8k-ood`", "byte 5-gram evaluator:", "neural LM evaluator:", "both agree",
                   "pool without domain `math`", "quad beats DSIR (target)", "seconds per selection"):
        assert needle in text, needle
    assert ("SETUP INVALID for `gsm8k`" in text) or ("data multiplier (neural LM): valid" in text)
    # a rerun reuses every cached artefact and gives the same numbers (DSIR and n-gram included)
    again = run(cfg)
    for t in ("gsm8k", "gsm8k-ood"):
        for m in ("quad-ekfac", "dsir"):
            for k in ("target_bpb", "ng_target_bpb"):
                assert again[t]["rows"][m][k]["per_seed"] == summaries[t]["rows"][m][k]["per_seed"], (t, m, k)


def test_all_runs_every_target_and_ood_variant(tiny_data):
    cfg = make_config("tiny", data_dir=str(tiny_data))
    assert cfg.all_variants() == ["gsm8k", "linux", "wikitext", "gsm8k-ood", "linux-ood", "wikitext-ood"]
    with pytest.raises(ValueError, match="no pool domain"):
        make_config("tiny", data_dir=str(tiny_data), targets=["nope-ood"])


def test_other_scorers_as_quad_and_topk_methods(tiny_data, tmp_path):
    """Every other scorer (issue 8) runs as quad's scorer and as a topk baseline."""
    methods = ["random"] + [f"{sel}-{name}" for name in OTHER_SCORERS for sel in ("quad", "topk")]
    cfg = make_config("tiny", data_dir=str(tiny_data), cache_dir=str(tmp_path / "cache"), targets=["gsm8k"],
                      methods=methods, seeds=[0, 1])
    s = run(cfg)["gsm8k"]
    for name in OTHER_SCORERS:
        quad, topk = s["rows"][f"quad-{name}"], s["rows"][f"topk-{name}"]
        assert 0 < quad["selection"]["scorer_calls"] < s["pool_rows"], name
        assert topk["selection"]["scored_share"] == 1.0, name
        assert all(v > 0 for v in quad["target_bpb"]["per_seed"]), name
    # vog / el2n read the checkpoints the job's proxy step saved
    assert list((tmp_path / "cache" / "pool" / "stages").glob("proxy/model/checkpoints/step_*"))


def test_the_bench_selects_with_the_jobs_steps(tiny_data, tmp_path):
    """The bench's quad selection (scores from its score cache, injected into the job's selector
    step) is the selection ``quadsel run`` makes of the same job config with its own scoring."""
    from bench.quality.data import job_config, prepare_pool, prepare_seed_model, read_reference
    from bench.quality.scoring import score_cache
    from bench.quality.select import run_method, selection_config
    from quadsel.jobs.run_job import run_selection

    cfg = make_config("tiny", data_dir=str(tiny_data), cache_dir=str(tmp_path / "cache"), targets=["gsm8k"])
    pool = prepare_pool(cfg)
    model = prepare_seed_model(cfg, pool, 0)
    budget = model.run.selector_parts()[1].amount
    cache = score_cache(cfg, pool, model, "ekfac", "gsm8k", read_reference(cfg, "gsm8k"), model.seed)
    rec = run_method("quad-ekfac", pool, model, budget, 0, cache)
    cache.close()
    job = job_config(cfg, pool.path, None, 0, target="gsm8k", scorer="ekfac")
    job = job.model_copy(update={"run_dir": str(tmp_path / "job"), "selection": selection_config("quad-ekfac", budget)})
    summary = run_selection(job)
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "job" / "bandit" / "selected.parquet").column("row").to_pylist()
    assert rec.rows.tolist() == rows and summary["selected"] == len(rows) > 0
    assert rec.used_tokens == summary["selected_tokens"]
    # each scorer gets the common settings it has: grad-cos takes no damping
    gradcos = job_config(cfg, pool.path, None, 0, target="gsm8k", scorer="grad-cos")
    assert "damping" not in gradcos.scorer.model_fields_set
    assert job.scorer.damping == cfg.scorer.damping and job.model.proxy.checkpoints == min(3, cfg.proxy.steps - 1)


def test_stats_helpers():
    ci = paired([1.0, 1.1, 0.9], [1.2, 1.3, 1.15])
    assert ci["hi"] < 0 and ci["lo"] < ci["mean"] < ci["hi"]
    assert data_multiplier(1.5, {1: 2.0, 2: 1.5, 4: 1.2}) == "2.00x"
    assert data_multiplier(2.5, {1: 2.0, 2: 1.5, 4: 1.2}) == "<= 1x"
    assert data_multiplier(1.0, {1: 2.0, 2: 1.5, 4: 1.2}) == ">= 4x"
    assert data_multiplier(1.0, {1: 2.0, 2: 2.1, 4: 1.2}).startswith("n/a")


def test_scorer_option_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--scorer-option", "el2n-prefer-low", "--report-only", "--out", "-"])
    assert "NAME.KEY=VALUE" in capsys.readouterr().err


def test_config_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown"):
        make_config("tiny", methods=["random", "nope"])


# ---- the byte n-gram evaluator against a brute-force implementation ----

def _brute_wb(docs: list[bytes], order: int):
    """Interpolated Witten–Bell with dictionaries: P(w | history) for a list of history symbols."""
    joint = [Counter() for _ in range(order)]
    for d in docs:
        s = [BOUNDARY] * (order - 1) + list(d)
        for t in range(order - 1, len(s)):
            for k in range(order):
                joint[k][(tuple(s[t - k:t]), s[t])] += 1
    tot = [defaultdict(int) for _ in range(order)]
    typ = [defaultdict(int) for _ in range(order)]
    for k in range(order):
        for (h, _w), c in joint[k].items():
            tot[k][h] += c
            typ[k][h] += 1

    def prob(hist: list[int], w: int) -> float:
        p = 1 / 256
        for k in range(order):
            h = tuple(hist[len(hist) - k:]) if k else ()
            if tot[k].get(h, 0):
                p = (joint[k].get((h, w), 0) + typ[k][h] * p) / (tot[k][h] + typ[k][h])
        return p
    return prob


_DOCS = [b"abracadabra", b"abc abc abd", "h\u00e9llo w\u00f6rld".encode(), b""]


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_ngram_matches_brute_force(order):
    lm = ByteNgramLM.fit(_DOCS, order=order)
    prob = _brute_wb(_DOCS, order)
    for ctx in (b"ab", b"abra", b"", b"zz", b"c a", "\u00e9".encode()):
        p = lm.next_byte_probs(ctx, at_start=(ctx == b""))
        assert abs(p.sum() - 1) < 1e-12 and (p > 0).all()
        hist = ([BOUNDARY] * (order - 1) + list(ctx))[-(order - 1):] if order > 1 else []
        q = np.array([prob(hist, w) for w in range(256)])
        np.testing.assert_allclose(p, q, rtol=1e-12, atol=0)
    ev = [b"abracadabra abc", b"x", "w\u00f6r".encode()]
    bits, n = lm.bits(ev)
    direct = 0.0
    for d in ev:
        s = [BOUNDARY] * (order - 1) + list(d)
        for t in range(order - 1, len(s)):
            direct -= math.log2(prob(s[t - (order - 1):t] if order > 1 else [], s[t]))
    assert n == sum(len(d) for d in ev) and abs(bits - direct) < 1e-9


def test_ngram_fit_and_evaluate_reports_bpb_and_seconds():
    train = ["the cat sat on the mat. " * 20, "a dog ran in the park. " * 20]
    res = fit_and_evaluate(train, {"same": ["the cat sat on the mat."], "other": ["zzqx 9876 %%%"]}, order=4)
    assert res["train_bytes"] == sum(len(t.encode()) for t in train) and res["seconds"] >= 0
    lm = ByteNgramLM.fit([t.encode() for t in train], order=4)
    bits, n = lm.bits([b"the cat sat on the mat."])
    assert res["eval"]["same"]["bpb"] == pytest.approx(bits / n)
    assert res["eval"]["same"]["bpb"] < 1.0 < res["eval"]["other"]["bpb"]
    assert ByteNgramLM.fit([b""], order=3).bits([b"ab"])[0] == pytest.approx(16.0)  # uniform base: 8 bits/byte
    with pytest.raises(ValueError, match="order"):
        ByteNgramLM.fit([b"a"], order=9)


def test_dsir_helpers():
    # the package shards one file virtually (row i -> shard i % P) and concatenates the shards
    rows = np.arange(7, dtype=np.float64)
    parts = [rows[j::3] for j in range(3)]
    np.testing.assert_array_equal(_unshard(parts, 3, 7), rows)
    # rows in order while they fit; one that does not fit is skipped
    got = take_to_budget(np.array([4, 0, 1, 2, 3]), np.array([5, 50, 2, 3, 4]), 12)
    assert got.tolist() == [4, 0, 2]
