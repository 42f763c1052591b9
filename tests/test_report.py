"""`vascdist report`: the self-contained HTML of a run (written by `vascdist train` itself) and of a CV directory,
parsed back: every section present, every image an embedded PNG that decodes."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

from PIL import Image
import pytest

from helpers import run_cli

pytestmark = pytest.mark.slow

RUN_SECTIONS = {"data-summary", "learning-curves", "ROC-and-PR-curves", "reliability-diagram", "confusion-matrices",
                "metrics", "per-site", "config-and-versions"}  # per-site: the synthetic manifest has a site column


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.images, self.cells, self.headers = [], [], [], []
        self._in_cell = self._in_header = False
        self.html = ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        if tag == "img":
            self.images.append((self.sections[-1], attrs["src"]))
        self._in_cell, self._in_header = tag == "td", tag == "th"

    def handle_data(self, data):
        if self._in_cell:
            self.cells.append(data)
        if self._in_header:
            self.headers.append(data)


def parse(path) -> Page:
    page = Page()
    page.html = path.read_text()
    page.feed(page.html)
    for _, src in page.images:
        assert src.startswith("data:image/png;base64,")  # embedded, nothing to fetch
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.format == "PNG" and image.size[0] > 100
    return page


def test_train_writes_a_run_report(shards_dir, tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", "quickstart", f"data.shards={shards_dir}", "data.synth_patients=0", "data.batch_size=16",
                     "data.reader_threads=0", "model.width=0.125", "train.epochs=2", "train.max_steps=40",
                     "train.eval_every=10", "eval.bootstrap_resamples=100", "eval.min_patients_per_class=1",
                     "--run-dir", str(run), "--quiet", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"report: {run / 'report.html'}" in result.stdout
    page = parse(run / "report.html")
    assert set(page.sections) == RUN_SECTIONS
    per_section = {s: sum(1 for x, _ in page.images if x == s) for s in RUN_SECTIONS}
    assert per_section["learning-curves"] == 2 and per_section["ROC-and-PR-curves"] == 2  # ROC + PR, 2 levels
    assert per_section["reliability-diagram"] == 1 and per_section["confusion-matrices"] == 3
    assert any("[" in c and "-" in c for c in page.cells)  # value [lo-hi] cells
    text = (run / "report.html").read_text()
    record = json.loads((run / "test_metrics.json").read_text())
    best = record["checkpoint_step"]  # the figures say which checkpoint drew them: the best one, not the last
    assert 0 < best <= 40 and f"best checkpoint, step {best}" in text
    # 12 test patients: slope and intercept are named as omitted, not printed as numbers
    assert record["calibration_caveat"].startswith("omitted:") and record["calibration_caveat"] in page.cells
    again = run_cli("report", str(run))
    assert again.returncode == 0 and "report.html" in again.stdout


def test_cv_report(shards_dir, tmp_path):
    from helpers import cv_args
    out = tmp_path / "cv"
    result = run_cli(*[a if a != "train.max_steps=20" else "train.max_steps=10" for a in cv_args(shards_dir, out)],
                     env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    page = parse(out / "report.html")
    assert page.sections == ["aggregate", "per-site", "ROC-and-PR-curves", "folds", "config-and-versions"]
    assert len(page.images) == 2  # ROC + PR per level (recording, patient), folds and pooled together
    assert "<pre>" not in page.html.split('id="aggregate"')[1].split("</section>")[0]  # tables, not a text dump
    assert {"r0-f0", "r0-f1", "r0-f2", "mean ± sd"} <= set(page.headers)
    for fold in ("r0-f0", "r0-f1", "r0-f2"):
        assert set(parse(out / fold / "report.html").sections) == RUN_SECTIONS
