"""A comparison's files from its scored rows (``python -m sat_train.compare``): metrics.csv, summary.csv,
the grids and report.html (report.py writes each; this module decides what goes in them), and the verdict.

A row is one image: ``source, file, prompt_index, seed, step``, the metric columns, and two keys that are
not columns: ``path`` (where the image is) and ``boxes`` (its faces' boxes, for the grids).

Grids: ``grid_pNN.png`` per prompt (rows = sources, columns = seeds: the files ``pNN_s{seed}.png``), then
the files no prompt grid shows (``--images`` sources) in ``grid_images_NN.png``, GRID_COLUMNS files a
grid in file-name order; each grid's rows are the sources that have at least one of its files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..outputs.pictures import save_png
from .report import image_grid, write_metrics_csv, write_report_html, write_summary_csv
from .sources import read_image
from .stats import METRIC_COLUMNS, has_face, summarize, underpowered, verdict

GRID_COLUMNS = 8  # files per --images grid: eight 512 px cells make a 4k-wide picture


@dataclass(frozen=True)
class GridPage:
    """One grid file: its name, its column headings and the image file each column shows."""

    name: str
    labels: tuple[str, ...]
    files: tuple[str, ...]


@dataclass(frozen=True)
class Results:
    verdict: str
    warning: str | None
    faces_found: bool  # False: no image has a face, every face metric is empty (report.html says so too)
    files: tuple[Path, ...]


def image_name(prompt_index: int, seed: int) -> str:
    """A generated image's file name: the same in every source, so that sources pair by (prompt, seed)."""
    return f"p{prompt_index:02d}_s{seed}.png"


def grid_pages(rows: Sequence[Mapping], prompt_count: int, seeds: Sequence[int]) -> list[GridPage]:
    """The grids (module docstring): one per prompt, then the remaining files in pages of GRID_COLUMNS."""
    pages = [GridPage(f"grid_p{i:02d}.png", tuple(f"seed {s}" for s in seeds),
                      tuple(image_name(i, s) for s in seeds)) for i in range(prompt_count)]
    shown = {file for page in pages for file in page.files}
    rest = sorted({row["file"] for row in rows} - shown)
    pages += [GridPage(f"grid_images_{k:02d}.png", tuple(rest[i:i + GRID_COLUMNS]), tuple(rest[i:i + GRID_COLUMNS]))
              for k, i in enumerate(range(0, len(rest), GRID_COLUMNS))]
    return pages


def grid_picture(page: GridPage, rows: Sequence[Mapping]):
    """``page``'s grid (report.image_grid) with face boxes; a source lacking a file gets a grey cell."""
    by_source: dict[str, dict[str, Mapping]] = {}
    for row in rows:
        by_source.setdefault(row["source"], {})[row["file"]] = row
    images, boxes = {}, {}
    for source, files in by_source.items():
        cells = [files.get(file) for file in page.files]
        if not any(cells):
            continue
        pictures = [None if row is None else read_image(Path(row["path"])) for row in cells]
        images[source] = [p if not isinstance(p, str) else None for p in pictures]  # gone since it was scored
        boxes[source] = [None if row is None else row.get("boxes") for row in cells]
    return image_grid(images, boxes, labels=list(page.labels))


def report_rows(rows: Sequence[Mapping], runs: Mapping[str, str]) -> list[Mapping]:
    """The rows with ``step`` kept only for the run with the most checkpoints among the sources (two at
    least): report.html plots one run's metrics over its steps, and pooling two runs' checkpoints of one
    step would mix them. ``runs``: source name -> its run (sources.Source.run)."""
    steps: dict[str, set] = {}
    for row in rows:
        if row.get("step") is not None:
            steps.setdefault(runs[row["source"]], set()).add(row["step"])
    plotted = max(steps, key=lambda run: len(steps[run]), default=None)
    return [row if runs[row["source"]] == plotted else {**row, "step": None} for row in rows]


def write_results(output_dir: Path, rows: Sequence[Mapping], pages: Sequence[GridPage],
                  runs: Mapping[str, str]) -> Results:
    """metrics.csv, summary.csv, the grids and report.html in ``output_dir``; the verdict line and the
    underpowered warning (None when the comparison has enough pairs)."""
    summary = summarize(rows)
    line = verdict(summary)
    warning = underpowered(summary)
    files = [write_metrics_csv(output_dir / "metrics.csv", rows, METRIC_COLUMNS),
             write_summary_csv(output_dir / "summary.csv", summary, METRIC_COLUMNS)]
    grids = [save_png(grid_picture(page, rows), output_dir / page.name) for page in pages
             if any(row["file"] in page.files for row in rows)]
    files += grids
    files.append(write_report_html(output_dir / "report.html", summary, line, grids, report_rows(rows, runs),
                                   METRIC_COLUMNS, warning))
    return Results(line, warning, any(has_face(row) for row in rows), tuple(files))
