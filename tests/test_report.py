"""`quadsel report`: a self-contained HTML report, checked as text and in a headless Chromium."""
from __future__ import annotations

import base64
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from test_inspect import shared_runs

from quadsel.jobs.cli import main
from quadsel.jobs.report import SECTIONS, ReportError, build_report, write_report
from quadsel.jobs.report_data import InspectError

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return shared_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def reports(runs) -> dict[str, tuple[Path, str]]:
    out = {}
    for name, run in runs.items():
        path = write_report(run)
        out[name] = (path, path.read_text(encoding="utf-8"))
    return out


def _sections(text: str) -> dict[str, str]:
    found = re.findall(r'<section id="([^"]+)"><h2>[^<]+</h2>(.*?)</section>', text, flags=re.S)
    return dict(found)


def _assert_self_contained(text: str) -> None:
    refs = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', text)
    assert refs
    for ref in refs:
        assert not re.match(r"(?i)\s*(https?:|//|ftp:|file:)", ref), ref
        assert ref.startswith(("data:image/png;base64,", "#")), ref[:60]
    assert "<script" not in text and "<link" not in text and "@import" not in text and "url(" not in text


def test_report_sections_images_and_content(reports, runs):
    path, text = reports["quad"]
    assert path == runs["quad"] / "report.html"
    secs = _sections(text)
    assert list(secs) == list(SECTIONS)
    _assert_self_contained(text)
    imgs = re.findall(r'<img src="data:image/png;base64,([^"]+)"', text)
    assert len(imgs) >= 7  # composition, scores, trajectory, map, budget, domains, timings
    for b in imgs:
        assert base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n"
    for sid in ("composition", "scores", "trajectory", "centroid-map", "budget", "domains", "timings"):
        assert "<img " in secs[sid], sid
    assert "class=\"missing\"" not in text  # a quad run on a pool with domains has every part
    assert "which the selector never reads" in secs["domains"]
    assert "truncated" in secs["rejects"] and "kept" in secs["rejects"]
    assert "selection:" in secs["config"] and "method: quad" in secs["config"]
    assert "60 of 60 examples used" in secs["budget"]
    # deterministic: the same run gives the same bytes
    assert build_report(runs["quad"]) == text


def test_report_without_bandit_data(reports):
    _, text = reports["cluster"]
    secs = _sections(text)
    assert list(secs) == list(SECTIONS)
    _assert_self_contained(text)
    for sid in ("scores", "trajectory", "budget", "domains"):
        assert 'class="missing"' in secs[sid], sid
    for sid in ("composition", "centroid-map", "timings"):
        assert "<img " in secs[sid], sid
    assert "clustering only" in secs["overview"]

    _, text = reports["random"]
    secs = _sections(text)
    assert "random selector has no bandit rounds" in secs["trajectory"]
    assert "random selector scored no rows" in secs["scores"]
    assert "<img " in secs["domains"] and "<img " in secs["composition"]


def test_report_errors_and_cli(runs, tmp_path, capsys):
    with pytest.raises(InspectError, match="no clusters/summary.parquet"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path / "missing"), "-q"]) == 2
    assert "quadsel report: error:" in capsys.readouterr().err
    out = tmp_path / "sub" / "r.html"
    assert main(["report", str(runs["cluster"]), "--out", str(out), "-q"]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ReportError, match="cannot write"):
        write_report(runs["cluster"], blocker / "r.html")


def _driver(profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={profile}", "--window-size=1300,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def test_report_in_headless_chromium(reports, runs):
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian packages chromium, chromium-driver; "
                    "`make test` installs them)")
    pytest.importorskip("selenium")
    path, _ = reports["quad"]
    with tempfile.TemporaryDirectory(prefix="quadsel-chromium-") as profile:
        driver = _driver(profile)
        try:
            driver.get(path.resolve().as_uri())
            driver.execute_script("return document.readyState")
            ids = driver.execute_script("return Array.from(document.querySelectorAll('section')).map(s => s.id)")
            assert ids == list(SECTIONS)
            heads = driver.execute_script("return Array.from(document.querySelectorAll('section > h2')).length")
            assert heads == len(SECTIONS)
            images = driver.execute_script(
                "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            assert len(images) >= 7 and all(ok and w > 0 and h > 0 for ok, w, h in images), images
            severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
            assert not severe, severe
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1300, min(int(height) + 120, 16000))  # the whole page
            shot = runs["quad"] / "report.png"
            assert driver.save_screenshot(str(shot))
        finally:
            driver.quit()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


def test_rejects_summary_counts_reasons_files_and_examples(tmp_path):
    import json

    from quadsel.jobs.report_data import read_rejects

    lines = [{"file": "a.jsonl", "line": i, "reason": "malformed_json", "detail": "bad", "id": None} for i in range(5)]
    lines += [{"file": "b.jsonl", "line": 1, "reason": "duplicate_id", "detail": "seen", "id": "x"},
              {"file": "a.jsonl", "line": 9, "reason": "truncated", "detail": "cut", "id": "y"}]
    path = tmp_path / "rejects.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "{not json\n")
    rj = read_rejects(path, examples=2)
    assert rj["by_reason"] == {"malformed_json": 5, "duplicate_id": 1, "truncated": 1}
    assert rj["by_file"][0] == ["a.jsonl", "malformed_json", 5]
    assert [e["line"] for e in rj["examples"]["malformed_json"]] == [0, 1]
    assert rj["unreadable_lines"] == 1
    assert read_rejects(tmp_path / "none.jsonl")["present"] is False


def test_domain_mix_of_a_labelled_pool_for_the_report_and_the_demo(runs):
    """The demo's noise figures come from the run directory (the production job computes none)."""
    from quadsel.jobs.report_data import domain_mix
    from quadsel.pipeline.demo import noise_share

    mix = domain_mix(str(runs["quad"]))  # a str run dir, as the demo passes it
    assert mix is not None and set(mix) == {"pool", "selection"}
    assert sum(mix["selection"].values()) == json.loads((runs["quad"] / "summary.json").read_text())["selected"]
    assert "noise_share" not in json.loads((runs["quad"] / "summary.json").read_text())
    share = noise_share(mix)
    assert share is None or 0 <= share["selection"] <= 1
    assert domain_mix(runs["cluster"]) is None  # nothing selected
