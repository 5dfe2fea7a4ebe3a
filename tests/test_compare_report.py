"""The statistics and the files of ``python -m sat_train.compare``: the bootstrap against one written
here from its contract and against the normal approximation, paired differences over the shared files
only, the summary's columns and the verdict on constructed sources; the CSVs read back with the csv
module, the grids checked pixel by pixel, report.html parsed with html.parser."""

from __future__ import annotations

import base64
import csv
import io
import math
import os
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

import sat_train.evaluate.stats as stats
from sat_train.outputs.pictures import save_png
from sat_train.evaluate.report import (BOX_COLOR, MISSING_COLOR, NO_FACE_NOTE, PAD, image_grid, write_metrics_csv,
                                       write_report_html, write_summary_csv)
from sat_train.evaluate.stats import (METRIC_COLUMNS, bootstrap_interval, format_interval, format_number,
                                      paired_difference, summarize, summary_columns, underpowered, verdict)


def bootstrap_here(values, level=0.95, resamples=2000, seed=0):
    """The documented contract, written out: one (resamples, n) index draw, quantiles of the row means."""
    v = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(v), size=(resamples, len(v)))
    means = v[idx].mean(axis=1)
    return np.quantile(means, (1 - level) / 2), np.quantile(means, (1 + level) / 2)


# ---- bootstrap ----------------------------------------------------------------------------------

def test_bootstrap_mean_is_numpys_and_interval_follows_the_contract():
    values = np.random.default_rng(3).gamma(2.0, 5.0, size=37)
    mean, low, high = bootstrap_interval(values.tolist(), seed=7)
    assert mean == pytest.approx(values.mean(), rel=1e-12)
    assert (low, high) == pytest.approx(bootstrap_here(values, seed=7), rel=1e-12)
    assert low < mean < high


def test_bootstrap_drawn_in_chunks_gives_the_one_draw_result(monkeypatch):
    values = np.random.default_rng(4).normal(size=50)
    monkeypatch.setattr(stats, "CHUNK_INDICES", 120)  # 2 resamples per chunk, 250 chunks
    assert bootstrap_interval(values, resamples=500, seed=1)[1:] == pytest.approx(bootstrap_here(values, resamples=500, seed=1), rel=1e-12)


def test_bootstrap_is_deterministic_for_a_seed_and_varies_across_seeds():
    values = list(np.random.default_rng(5).normal(size=30))
    assert bootstrap_interval(values, seed=2) == bootstrap_interval(values, seed=2)
    assert bootstrap_interval(values, seed=2) != bootstrap_interval(values, seed=3)


def test_bootstrap_of_a_large_normal_sample_is_mean_pm_1_96_standard_errors():
    values = np.random.default_rng(6).normal(10.0, 3.0, size=4000)
    mean, low, high = bootstrap_interval(values)
    half = 1.959964 * values.std() / math.sqrt(values.size)
    assert low == pytest.approx(mean - half, abs=0.08 * half)
    assert high == pytest.approx(mean + half, abs=0.08 * half)


def test_bootstrap_narrows_with_n_and_with_a_lower_level():
    draws = np.random.default_rng(8).normal(0.0, 1.0, size=2000)
    _, low_small, high_small = bootstrap_interval(draws[:20])
    _, low_large, high_large = bootstrap_interval(draws)
    # the width shrinks like 1/sqrt(n): sqrt(2000 / 20) = 10
    assert 6 < (high_small - low_small) / (high_large - low_large) < 15
    _, low_half, high_half = bootstrap_interval(draws, level=0.5)
    assert low_large < low_half < high_half < high_large


def test_bootstrap_edge_cases():
    assert bootstrap_interval([2.5, 2.5, 2.5, 2.5]) == (2.5, 2.5, 2.5)
    assert bootstrap_interval([0.1] * 7)[1:] == (np.mean([0.1] * 7),) * 2
    assert bootstrap_interval([]) is None
    assert bootstrap_interval([None, float("nan")]) is None
    mean, low, high = bootstrap_interval([None, 4.0, float("nan")])
    assert mean == 4.0 and math.isnan(low) and math.isnan(high)
    # None and NaN are left out, not counted as zero
    assert bootstrap_interval([1.0, None, 3.0, float("nan")], seed=4) == bootstrap_interval([1.0, 3.0], seed=4)


# ---- paired difference --------------------------------------------------------------------------

def test_paired_difference_uses_only_files_both_measured():
    first = {"a.png": 1.0, "b.png": 2.0, "c.png": None, "d.png": 4.0, "f.png": 0.5}
    other = {"b.png": 5.0, "a.png": 3.0, "c.png": 7.0, "d.png": float("nan"), "e.png": 9.0, "f.png": 0.0}
    result = paired_difference(first, other, seed=3)
    diffs = [3.0 - 1.0, 5.0 - 2.0, 0.0 - 0.5]  # a, b, f in sorted file order
    assert result.pairs == 3 and result.mean == pytest.approx(np.mean(diffs))
    assert (result.low, result.high) == pytest.approx(bootstrap_here(diffs, seed=3))
    # the dicts' order does not matter
    assert paired_difference(dict(reversed(first.items())), dict(reversed(other.items())), seed=3) == result


def test_paired_difference_without_pairs():
    assert paired_difference({"a": 1.0}, {"b": 2.0}) == stats.Paired(0, None, None, None)
    assert paired_difference({"a": None}, {"a": 2.0}).pairs == 0


def test_pairing_finds_a_shift_that_two_independent_intervals_miss():
    """Why pairs: prompts and seeds vary far more than the sources do."""
    rng = np.random.default_rng(9)
    base = rng.normal(100, 30, size=40)
    shifted = base + 3 + rng.normal(0, 1, size=40)
    files = [f"p00_s{i:04d}.png" for i in range(40)]
    _, low_a, high_a = bootstrap_interval(base)
    _, low_b, high_b = bootstrap_interval(shifted)
    assert low_b < high_a  # the two means' intervals overlap
    result = paired_difference(dict(zip(files, base)), dict(zip(files, shifted)))
    assert result.low > 0 and result.mean == pytest.approx(np.mean(shifted - base))


# ---- summary, verdict, warning ------------------------------------------------------------------

def row(source, file, **metrics):
    return {"source": source, "file": file, "prompt_index": 0, "seed": 0, "step": None,
            **{m: metrics.get(m) for m in METRIC_COLUMNS}}


def test_summarize_columns_order_and_values():
    rows = [row("plain", "a.png", faces=1, face_sharpness=10.0), row("sat", "a.png", faces=2, face_sharpness=14.0),
            row("plain", "b.png", faces=0), row("sat", "b.png", faces=1, face_sharpness=9.0),
            row("plain", "c.png", faces=1, face_sharpness=20.0), row("sat", "d.png", faces=None)]
    summary = summarize(rows)
    assert [s["source"] for s in summary] == ["plain", "sat"]
    plain, sat = summary
    # the first source has no difference against itself; summary.csv orders the columns
    assert set(plain) == {c for c in summary_columns() if not c.endswith(("_diff", "_diff_low", "_diff_high", "_pairs"))}
    assert set(sat) == set(summary_columns())
    assert (plain["images"], sat["images"]) == (3, 3)
    assert plain["with_face"] == pytest.approx(2 / 3) and sat["with_face"] == pytest.approx(2 / 3)
    assert plain["face_sharpness_mean"] == pytest.approx(15.0) and sat["face_sharpness_mean"] == pytest.approx(23 / 2)
    # only a.png has face_sharpness in both; faces is measured on a, b (d has None, c only in plain)
    assert (sat["face_sharpness_pairs"], sat["face_sharpness_diff"]) == (1, pytest.approx(4.0))
    assert math.isnan(sat["face_sharpness_diff_low"])
    assert (sat["faces_pairs"], sat["faces_diff"]) == (2, pytest.approx(((2 - 1) + (1 - 0)) / 2))
    assert sat["identity_mean"] is None and sat["identity_pairs"] == 0 and sat["identity_diff"] is None


def test_summarize_refuses_a_file_twice_in_one_source():
    with pytest.raises(ValueError, match="two images named 'a.png'"):
        summarize([row("plain", "a.png", faces=1), row("plain", "a.png", faces=0)])


def constructed_sources(n=30):
    """base; good = base + 10 ± 1 on face_sharpness; noise = base ± 5 alternating (+0.2 on one file);
    worse = base - 0.05 on eye_balance. identity is never measured."""
    rng = np.random.default_rng(11)
    rows = []
    for i in range(n):
        file, sharp, balance = f"p00_s{i:04d}.png", float(rng.normal(100, 30)), float(rng.uniform(0.5, 0.9))
        rows += [row("base", file, faces=1, face_sharpness=sharp, eye_balance=balance),
                 row("good", file, faces=1, face_sharpness=sharp + 10 + float(rng.normal(0, 1)), eye_balance=balance),
                 row("noise", file, faces=1, face_sharpness=sharp + (5 if i % 2 else -5) + (0.2 if i == 0 else 0),
                     eye_balance=balance),
                 row("worse", file, faces=1, face_sharpness=sharp, eye_balance=balance - 0.05)]
    return rows


VERDICT = re.compile(r"(\w+) ([+-][\d.]+) \[(-?[\d.]+), (-?[\d.]+)\] (.+?) \(interval (excludes|includes) 0\)")


def test_verdict_names_the_leader_and_whether_the_interval_excludes_zero():
    line = verdict(summarize(constructed_sources()), ["face_sharpness", "eye_balance", "identity"])
    assert "\n" not in line and "higher is better" in line
    parts = dict(p.split(" vs base: ") for p in line.rsplit(" (difference", 1)[0].split("; "))
    assert list(parts) == ["good", "noise", "worse"]
    said = {source: {m[0]: m[1:] for m in VERDICT.findall(text)} for source, text in parts.items()}
    assert "identity" not in line  # never measured: nothing to say
    diff, low, high, leader, interval = said["good"]["face_sharpness"]
    assert (leader, interval) == ("good ahead", "excludes") and 9 < float(low) < float(diff) < float(high) < 11
    diff, low, high, leader, interval = said["noise"]["face_sharpness"]
    assert (leader, interval) == ("noise ahead", "includes") and float(low) < 0 < float(high)
    assert said["noise"]["eye_balance"][3:] == ("even", "includes")
    diff, low, high, leader, interval = said["worse"]["eye_balance"]
    assert (leader, interval) == ("base ahead", "excludes") and float(diff) == pytest.approx(-0.05)


def test_verdict_with_one_pair_or_one_source():
    summary = summarize([row("a", "x.png", face_sharpness=1.0), row("b", "x.png", face_sharpness=3.0)])
    assert "face_sharpness +2.00 b ahead (1 pair, no interval)" in verdict(summary, ["face_sharpness"])
    assert verdict(summary[:1]) == "one source (a): nothing to compare"


def test_underpowered_below_the_minimum_paired_images():
    rows = constructed_sources(n=12)
    warning = underpowered(summarize(rows, resamples=50))
    assert warning.startswith("warning: underpowered") and "good (12)" in warning and "worse (12)" in warning
    assert underpowered(summarize(constructed_sources(n=25), resamples=50)) is None
    assert underpowered(summarize(rows, resamples=50), minimum=12) is None
    assert underpowered(summarize([r for r in rows if r["source"] == "base"])) is None


def test_numbers_keep_three_significant_digits_without_exponents():
    assert [format_number(v) for v in (12.345, 0.012345, 1234.5, -0.5, 0.0)] == ["12.3", "0.0123", "1234", "-0.500", "0"]
    assert format_number(None) == "" and format_number(float("nan")) == "nan"
    assert format_interval(12.3, 4.06, 20.54, sign=True) == "+12.3 [4.1, 20.5]"
    assert format_interval(-0.004, -0.25, 0.5) == "-0.004 [-0.250, 0.500]"
    assert format_interval(2.0, float("nan"), float("nan"), sign=True) == "+2.00"


# ---- CSV files ----------------------------------------------------------------------------------

def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        return next(reader), list(reader)


def test_metrics_csv_reads_back_with_empty_cells_for_missing_values(tmp_path):
    rows = [{"identity": None, "file": "p00_s0000.png", "source": "runs/sat, v2", "prompt_index": 0, "seed": 0,
             "step": 500, "faces": 1, "face_score": 0.987654321, "face_sharpness": 1234.5678, "eye_sharpness": float("nan"),
             "eye_balance": 1 / 3, "boxes": [(1, 2, 3, 4)]},
            {"source": "none", "file": "x.png", "prompt_index": None, "seed": None, "step": None, "faces": 0}]
    path = write_metrics_csv(tmp_path / "out" / "metrics.csv", rows)
    header, lines = read_csv(path)
    assert header == ["source", "file", "prompt_index", "seed", "step", *METRIC_COLUMNS]
    assert lines[0][:7] == ["runs/sat, v2", "p00_s0000.png", "0", "0", "500", "1", "0.987654321"]
    assert float(lines[0][7]) == 1234.5678 and lines[0][8] == "" and float(lines[0][9]) == 1 / 3
    assert lines[0][10] == "" and lines[1] == ["none", "x.png", "", "", "", "0", "", "", "", "", ""]
    assert sorted(os.listdir(tmp_path / "out")) == ["metrics.csv"]


def test_summary_csv_reads_back(tmp_path):
    summary = summarize(constructed_sources(n=5), resamples=100)
    header, lines = read_csv(write_summary_csv(tmp_path / "summary.csv", summary))
    assert header == summary_columns()
    base, good = (dict(zip(header, line)) for line in lines[:2])
    assert base["source"] == "base" and base["images"] == "5" and float(base["with_face"]) == 1.0
    assert base["face_sharpness_diff"] == "" and base["face_sharpness_pairs"] == "" and base["identity_mean"] == ""
    assert float(good["face_sharpness_diff_low"]) == summary[1]["face_sharpness_diff_low"]
    assert good["face_sharpness_pairs"] == "5" and good["identity_pairs"] == "0" and good["identity_diff"] == ""


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = write_summary_csv(tmp_path / "summary.csv", summarize(constructed_sources(n=3), resamples=10))
    before = path.read_bytes()
    write_metrics_csv(tmp_path / "metrics.csv", constructed_sources(n=3))  # overwriting works too
    write_metrics_csv(tmp_path / "metrics.csv", constructed_sources(n=2))
    assert len(read_csv(tmp_path / "metrics.csv")[1]) == 8

    def interrupted(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(OSError, match="disk full"):
        write_summary_csv(path, [])
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv", "summary.csv"]


# ---- grids --------------------------------------------------------------------------------------

def solid(color, size=(64, 64)):
    return Image.new("RGB", size, color)


def test_grid_places_images_boxes_labels_and_blank_cells():
    red, blue, green = (200, 30, 30), (30, 30, 200), (40, 160, 40)
    images = {"none": [solid(red), None, solid(blue)], "runs/sat-sac/checkpoint-500": [solid(green), solid(blue)]}
    boxes = {"none": [[(10, 12, 40, 50)], None, []]}
    grid = image_grid(images, boxes, labels=["seed 0", "seed 1", "seed 2"])
    cell = 64 + PAD
    left, top = grid.width - 3 * cell, grid.height - 2 * cell  # the label column and the header row
    assert left > 60 and top > PAD  # room for the longer source name and for the seed labels

    def at(r, c, x, y):
        return grid.getpixel((left + c * cell + x, top + r * cell + y))

    assert at(0, 0, 25, 30) == red and at(0, 2, 32, 32) == blue and at(1, 0, 32, 32) == green
    assert at(0, 1, 32, 32) == MISSING_COLOR and at(1, 2, 32, 32) == MISSING_COLOR  # None and a shorter list
    assert at(0, 0, 10, 30) == BOX_COLOR and at(0, 0, 40, 30) == BOX_COLOR and at(0, 0, 25, 12) == BOX_COLOR
    assert at(0, 0, 5, 5) == red and at(1, 0, 10, 30) == green  # outside the box, and a row without boxes

    def dark_pixels(box):
        return sum(1 for p in grid.crop(box).convert("L").getdata() if p < 100)

    assert dark_pixels((0, top, left, top + 64)) > 10 and dark_pixels((0, top + cell, left, top + cell + 64)) > 10
    assert dark_pixels((left, 0, left + 64, top)) > 10  # "seed 0"


def test_grid_scales_large_images_and_their_boxes_and_centres_smaller_ones():
    big = solid((90, 90, 90), (1024, 1024))
    grid = image_grid({"a": [big], "b": [solid((250, 250, 0), (128, 64))]}, {"a": [[(512, 512, 1000, 1000)]]}, max_cell=256)
    cell = 256 + PAD
    left, top = grid.width - cell, grid.height - 2 * cell
    assert grid.getpixel((left + 128, top + 200)) == BOX_COLOR  # x0 = 512 / 4
    assert grid.getpixel((left + 200, top + 200)) == (90, 90, 90)
    # 128x64 in a 256x256 cell: centred, blank around it
    assert grid.getpixel((left + 128, top + cell + 128)) == (250, 250, 0)
    assert grid.getpixel((left + 40, top + cell + 128)) == (255, 255, 255)
    assert grid.getpixel((left + 128, top + cell + 60)) == (255, 255, 255)


# ---- report.html --------------------------------------------------------------------------------

class Page(HTMLParser):
    """The parts of report.html the tests read: cell texts, image sources, tags, polylines, text."""

    def __init__(self, text):
        super().__init__()
        self.cells, self.images, self.tags, self.polylines, self.text, self.cell = [], [], [], [], [], None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "td":
            self.cell = []
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "polyline":
            self.polylines.append([tuple(map(float, p.split(","))) for p in attrs["points"].split()])

    def handle_endtag(self, tag):
        if tag == "td":
            self.cells.append(" ".join(self.cell))
            self.cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self.cell is not None:
            self.cell.append(data.strip())


def hand_summary():
    first = {"source": "none", "images": 4, "with_face": 0.75, "face_sharpness_mean": 12.5,
             "face_sharpness_low": 10.5, "face_sharpness_high": 14.5}
    second = {"source": "sat-sac", "images": 4, "with_face": 1.0, "face_sharpness_mean": 14.5,
              "face_sharpness_low": 11.5, "face_sharpness_high": 17.5, "face_sharpness_diff": 2.0,
              "face_sharpness_diff_low": 0.5, "face_sharpness_diff_high": 3.5, "face_sharpness_pairs": 3}
    return [first, second]


def step_rows(faces=1):
    rows = []
    for step, means in ((100, 1.0), (200, 3.0), (300, 2.0)):
        for i, offset in enumerate((-0.5, 0.5)):
            rows.append({**row(f"checkpoint-{step}", f"s{i}.png", faces=faces, face_sharpness=means + offset), "step": step})
    return rows


def test_report_html_is_one_self_contained_page(tmp_path):
    grid = image_grid({"none": [solid((200, 30, 30))], "sat-sac": [solid((30, 30, 200))]}, labels=["seed 0"])
    grid_file = save_png(grid, tmp_path / "grid_p00.png")
    path = write_report_html(tmp_path / "report.html", hand_summary(), "sat-sac vs none: face_sharpness +2.00 <b>",
                             [grid_file], step_rows(), metrics=["face_sharpness"], warning="warning: underpowered")
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    assert page.cells[:4] == ["none", "4", "75%", "12.5 [10.5, 14.5]"]
    assert page.cells[4:7] == ["sat-sac", "4", "100%"] and page.cells[7] == "14.5 [11.5, 17.5] Δ +2.00 [0.50, 3.50] · 3 pairs"
    assert "sat-sac vs none: face_sharpness +2.00 <b>" in page.text and "<b>" not in text  # escaped, shown as text
    assert "warning: underpowered" in page.text and NO_FACE_NOTE not in text
    assert not {"script", "link", "iframe"} & set(page.tags) and "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    [src] = page.images
    assert src.startswith("data:image/png;base64,")
    embedded = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert embedded.size == grid.size and embedded.convert("RGB").tobytes() == grid.tobytes()
    assert sorted(os.listdir(tmp_path)) == ["grid_p00.png", "report.html"]


def test_report_plots_per_step_means_when_rows_carry_steps(tmp_path):
    path = write_report_html(tmp_path / "report.html", hand_summary(), "v", [], step_rows(), metrics=["face_sharpness", "identity"])
    page = Page(path.read_text(encoding="utf-8"))
    [line] = page.polylines  # face_sharpness; identity has no value at any step
    (x100, y100), (x200, y200), (x300, y300) = line
    assert x100 < x200 < x300 and y200 < y300 < y100  # means 1, 3, 2: a higher mean is drawn higher up
    assert (x200 - x100) == pytest.approx(x300 - x200)  # steps equally spaced
    assert {"100", "200", "300", "step"} <= {t.strip() for t in page.text}


def test_report_without_steps_has_no_plot_and_notes_when_no_face_was_found(tmp_path):
    rows = [{**r, "step": None} for r in step_rows(faces=0)]
    page = Page(write_report_html(tmp_path / "a.html", hand_summary(), "v", [], rows, metrics=["face_sharpness"]).read_text())
    assert "polyline" not in page.tags and "svg" not in page.tags and NO_FACE_NOTE in page.text
    one_step = [{**r, "step": 100} for r in step_rows()]
    assert "polyline" not in Page(write_report_html(tmp_path / "b.html", hand_summary(), "v", [], one_step).read_text()).tags


def test_report_scales_wide_grids_down_for_the_page_only(tmp_path):
    grid_file = save_png(solid((10, 200, 10), (900, 300)), tmp_path / "grid_p00.png")
    page = Page(write_report_html(tmp_path / "report.html", hand_summary(), "v", [grid_file], [], max_grid_width=300).read_text())
    assert Image.open(io.BytesIO(base64.b64decode(page.images[0].split(",", 1)[1]))).size == (300, 100)
    assert Image.open(grid_file).size == (900, 300)
