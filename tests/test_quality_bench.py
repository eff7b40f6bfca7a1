"""Smoke test of the selection-quality benchmark (bench.quality): the whole harness on a few
hundred real rows with tiny models. It checks the report's structure, not the quality claim."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` is not an installed package

from bench.quality import METHODS, make_config, run  # noqa: E402
from bench.quality.__main__ import main  # noqa: E402
from bench.quality.config import DEFAULT_METHODS, OTHER_SCORERS  # noqa: E402
from bench.quality.stats import data_multiplier, paired  # noqa: E402


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def tiny_data(bench_dir, tmp_path_factory) -> Path:
    """~400 pool docs (every 48th, cut to 600 chars) and 3 targets of 16 + 16 docs."""
    root = tmp_path_factory.mktemp("qdata")
    pool = []
    with open(bench_dir / "pool.jsonl", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i % 48 == 0:
                r = json.loads(line)
                r["text"] = r["text"][:600]
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
    rc = main(["--preset", "tiny", "--target", "gsm8k", "--data-dir", str(tiny_data), "--cache-dir", str(cache),
               "--out", str(out), "--quiet-progress"])
    assert rc == 0
    cfg = make_config("tiny", data_dir=str(tiny_data), cache_dir=str(cache), targets=["gsm8k"])
    from bench.quality import load_summaries

    summaries = load_summaries(cfg)
    assert list(summaries) == ["gsm8k"]
    s = summaries["gsm8k"]
    assert s["seeds"] == [0, 1]
    assert set(s["methods"]) == set(DEFAULT_METHODS)
    for m, r in s["rows"].items():
        for k in ("target_bpb", "mix_bpb", "target_loss", "mix_loss"):
            assert len(r[k]["per_seed"]) == 2 and all(v > 0 for v in r[k]["per_seed"])
        if m != "random":
            ci = r["target_bpb_vs_random"]
            assert ci["lo"] <= ci["mean"] <= ci["hi"]
        sel = r["selection"]
        if m != "reference":
            assert 0 <= sel["noise_share_tokens"] <= 1 and sel["cluster_entropy_nats"] >= 0
            assert sel["domain_mix_tokens"] and abs(sum(sel["domain_mix_tokens"].values()) - 1) < 0.02
    # random never scores; topk scores the whole pool; quad scores part of it
    assert s["rows"]["random"]["selection"]["scorer_calls"] == 0
    assert s["rows"]["topk-ekfac"]["selection"]["scored_share"] == 1.0
    assert 0 < s["rows"]["quad-ekfac"]["selection"]["scorer_calls"] <= s["pool_rows"]
    assert s["rows"]["quad-ekfac"]["selection"]["scoring_seconds_est"] is not None
    # a 2x / 4x budget holds about 2x / 4x the tokens
    used = {m: s["rows"][m]["selection"]["used_tokens"] for m in ("random", "random-2x", "random-4x")}
    assert used["random"] < used["random-2x"] < used["random-4x"]
    assert set(s["goals"]) == {"quad_beats_random_target", "quad_matches_or_beats_topk_mix",
                               "quad_scores_at_most_10pct"}
    text = out.read_text(encoding="utf-8")
    for needle in ("### Target `gsm8k`", "Goals at a glance", "quad (ekfac)", "random 4x budget",
                   "Δ target vs random", "cluster entropy"):
        assert needle in text
    # a rerun reuses every cached artefact and gives the same numbers
    again = run(cfg)["gsm8k"]
    assert again["rows"]["quad-ekfac"]["target_bpb"]["per_seed"] == s["rows"]["quad-ekfac"]["target_bpb"]["per_seed"]


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
    # vog / el2n read the checkpoints of a second, identical proxy run
    assert list((tmp_path / "cache" / "stages").glob("proxy-ckpt-s0/model/checkpoints/step_*"))


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
