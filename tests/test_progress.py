"""Progress is drawn once per process: library steps nest inside the job's bars as sub-steps."""
from __future__ import annotations

import json
import logging

import pytest

from quadsel.core import progress as progress_mod
from quadsel.core.progress import Progress


@pytest.fixture
def mode():
    old = progress_mod._settings.mode

    def set_mode(m):
        progress_mod._settings.mode = m

    yield set_mode
    progress_mod._settings.mode = old
    assert progress_mod._Display.rich is None and progress_mod._Display.depth == 0


def test_nested_bars_share_one_live_display(mode, monkeypatch):
    mode("pretty")
    started = []
    real = progress_mod._new_rich_display
    monkeypatch.setattr(progress_mod, "_new_rich_display", lambda: started.append(1) or real())
    with Progress("select", total=10) as outer:
        for _ in range(3):  # a library step per chunk, as a scorer's score() does
            with Progress("scores", total=4) as inner:
                inner.advance(4)
                assert inner._rich is outer._rich
                assert len(outer._rich.tasks) == 2
            assert len(outer._rich.tasks) == 1  # the finished sub-step is gone, not piled up
        outer.advance(10)
    assert started == [1]


def test_nested_steps_log_at_debug(mode, caplog):
    mode("log")
    with caplog.at_level(logging.DEBUG, logger="quadsel"):
        with Progress("select", total=2) as outer:
            with Progress("scores", total=1) as inner:
                inner.advance(1)
            outer.advance(2)
    levels = {r.getMessage().split(":")[0]: r.levelno for r in caplog.records if "done" in r.getMessage()}
    assert levels == {"scores": logging.DEBUG, "select": logging.INFO}


def test_a_job_runs_in_pretty_mode(tmp_path, monkeypatch):
    """`quadsel run --progress pretty`: the scorer's bars nest in the job's select bar."""
    import yaml
    from conftest import small_job

    from quadsel.jobs.cli import main

    cfg = small_job(tmp_path)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(["run", "job.yaml", "--progress", "pretty"])
    finally:
        progress_mod._settings.mode = "auto"
        logging.getLogger("quadsel").propagate = True
    assert rc == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "logs" / "run.jsonl").read_text().splitlines()]
    assert not [r for r in log if r["msg"].startswith("ekfac scores: done")]  # no INFO line per chunk
    assert progress_mod._Display.rich is None


def test_a_callback_gets_every_step_of_a_library_call_and_nothing_is_drawn(tmp_path, capsys, caplog):
    """Library code (here the embed path) reports to the caller's callback, nested steps with depth."""
    from quadsel.core.progress import Progress, progress_callback
    from quadsel.pipeline.embed import EmbedConfig
    from quadsel.pipeline.feature_stage import embed_texts

    events = []
    texts = [f"text number {i} about {'rivers' if i % 2 else 'kernels'} and more words" for i in range(60)]
    with caplog.at_level(logging.DEBUG, logger="quadsel"):
        with progress_callback(events.append), Progress("outer", total=1, unit="jobs") as outer:
            embed_texts(texts, EmbedConfig(dim=4, batch_size=16), tmp_path / "e")
            outer.advance(1)
    assert [(e.kind, e.desc, e.depth) for e in events if e.desc == "outer"] == [
        ("start", "outer", 0), ("advance", "outer", 0), ("done", "outer", 0)]
    feats = [e for e in events if e.desc == "features"]
    assert feats[0].kind == "start" and feats[-1].kind == "done" and feats[-1].count == 60
    assert [e.count for e in feats if e.kind == "advance"] == [16, 32, 48, 60]  # one per chunk
    assert all(e.depth == 1 for e in feats) and feats[0].total == 60
    assert not capsys.readouterr().err  # nothing drawn
    assert not [r for r in caplog.records if r.name == "quadsel.core.progress"]  # nor logged
