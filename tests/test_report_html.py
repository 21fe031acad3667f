"""report.html of `kedit eval` and `kedit compare`: valid HTML, self-contained, every metric, renders headless."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from eval_helpers import FakeEditor
from test_eval_harness import W, _cf_case
from test_eval_mquake import _health

from kedit.eval import Evaluator
from kedit.eval.report import load_summary, write

VOID = {"meta", "img", "br", "hr", "input", "link", "col", "area", "base", "source", "wbr"}


class Checker(HTMLParser):
    """Tag balance, external references and visible text of a page."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.refs: list[str] = []
        self.text: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.refs += [v or "" for k, v in attrs if k in ("src", "href", "action", "data")]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def check_page(text: str) -> Checker:
    c = Checker()
    c.feed(text)
    c.close()
    assert not c.errors and not c.stack, (c.errors, c.stack)
    assert text.startswith("<!DOCTYPE html>") and {"html", "head", "body", "table"} <= c.tags
    assert "http://" not in text and "https://" not in text  # no network
    assert all(r.startswith(("data:image/png;base64,", "#")) for r in c.refs), c.refs
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two written runs (sequential MEMIT-like edit with health; unedited), shared by the tests of this module."""
    from eval_helpers import BigramLM, base_table, word_tok

    tmp_path = tmp_path_factory.mktemp("runs")
    table = base_table()
    table[W["in"], W["Africa"]] += 2.0
    model, tok = BigramLM(table), word_tok()
    ev = Evaluator(model, tok, health=_health(model, tok, tmp_path))
    cases = [_cf_case(i) for i in range(4)]
    write(ev.run(cases, FakeEditor(model, W["in"], W["Antarctica"], 2.0), mode="sequential", batch_size=2,
                 extra_config={"dataset": {"spec": "counterfact:mem"}, "command": "kedit eval <test>"}),
          tmp_path / "a")
    write(ev.run(cases, None, extra_config={"dataset": {"spec": "counterfact:mem"}}), tmp_path / "b")
    return tmp_path


def test_run_report_is_valid_self_contained_and_complete(runs):
    text = (runs / "a" / "report.html").read_text()
    page = check_page(text)
    s = load_summary(runs / "a")
    metrics = [k for k, v in s.items() if isinstance(v, dict) and "mean" in v]
    assert len(metrics) > 10 and {"health_perplexity", "efficacy_score", "score"} <= set(metrics)
    visible = "\n".join(page.text)
    for k in metrics:
        assert k in visible, k
    assert f"{s['efficacy_score']['mean']:.4g}" in visible and "kedit eval &lt;test&gt;" in text  # escaped
    assert text.count("data:image/png;base64,") == 3  # metrics, p_new scatter, health over edits
    assert 'id="cases" class="sortable"' in text and "<script>" in text
    cases = [json.loads(line) for line in (runs / "a" / "cases.jsonl").read_text().splitlines()]
    assert visible.count("Angola is located in") >= len(cases)


def test_compare_report_lines_up_runs(runs):
    from kedit.cli import main

    assert main(["compare", str(runs / "a"), str(runs / "b"), "--png", str(runs / "c.png")]) == 0
    text = (runs / "compare.html").read_text()
    assert (runs / "c.png").is_file()
    page = check_page(text)
    visible = "\n".join(page.text)
    for k in ("efficacy_score", "health_perplexity", "health_kl", "neighborhood_kl"):
        assert k in visible
    assert (runs / "c_health.png").is_file() and text.count("data:image/png;base64,") == 2


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no headless browser: install Debian's 'chromium' package")
def test_report_renders_in_headless_chromium(runs, tmp_path):
    import matplotlib.image

    png = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1200,1600",
           (runs / "a" / "report.html").resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    img = matplotlib.image.imread(png)[..., :3]  # [H, W, 3] floats
    assert img.shape[:2] == (1600, 1200)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # text, table borders and plots, not a blank page
    top = img[:800]
    assert (top < 0.5).mean() > 0.005  # dark text (the title, run record and metric table) in the upper half
