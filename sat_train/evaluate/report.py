"""The files of ``python -m sat_train.compare``: metrics.csv, summary.csv, the per-prompt image grids
and report.html (one self-contained page: inline CSS, PNG data URIs, hand-written SVG; no JS, no
external files, so it can be mailed or attached as it is). Every file is written atomically (temp file
beside it + os.replace): an interrupted compare never leaves half a file that looks whole."""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..faults import write_atomically
from ..outputs.pictures import png_bytes
from .stats import METRIC_COLUMNS, bootstrap_interval, format_interval, format_number, has_face, present, summary_columns

ROW_COLUMNS = ("source", "file", "prompt_index", "seed", "step")
NO_FACE_NOTE = "no face found in any image: the face metrics are empty"
BOX_COLOR = (0, 220, 0)
MISSING_COLOR = (205, 205, 205)
PAD = 6


# ---- CSV ----------------------------------------------------------------------------------------

def csv_cell(value) -> str:
    """None and NaN (not measured) → an empty cell; numbers as Python prints them (floats round-trip)."""
    return "" if not present(value) else str(value)


def write_csv(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[Mapping]) -> Path:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(columns)
    for row in rows:
        # other keys a row carries (the grids' face boxes) are not columns
        writer.writerow([csv_cell(row.get(c)) for c in columns])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, text.getvalue().encode("utf-8"))


def write_metrics_csv(path: str | os.PathLike, rows: Iterable[Mapping], metrics: Sequence[str] = METRIC_COLUMNS) -> Path:
    """metrics.csv: one row per image, columns ``source, file, prompt_index, seed, step`` then the metrics."""
    return write_csv(path, ROW_COLUMNS + tuple(metrics), rows)


def write_summary_csv(path: str | os.PathLike, summary: Iterable[Mapping], metrics: Sequence[str] = METRIC_COLUMNS) -> Path:
    """summary.csv: one row per source in ``stats.summary_columns`` order."""
    return write_csv(path, summary_columns(metrics), summary)


# ---- grids --------------------------------------------------------------------------------------

def text_extent(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    """How far right and down ``text`` drawn at (0, 0) reaches (the glyphs start below the origin)."""
    _, _, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right, bottom


def default_font(size: int):
    """PIL's default font at ``size`` px, readable at a 512 px cell's scale (a bare load_default() is
    10 px); its fixed bitmap font where PIL was built without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ImportError):
        return ImageFont.load_default()


def fitted(image: Image.Image, max_cell: int) -> tuple[Image.Image, float]:
    """``image`` as RGB, scaled down so that its longer side is at most ``max_cell``; and the scale."""
    scale = min(1.0, max_cell / max(image.size))
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    return image.convert("RGB"), scale


def image_grid(images_by_source: Mapping[str, Sequence[Image.Image | None]],
               boxes_by_source: Mapping[str, Sequence[Sequence[Sequence[float]] | None]] | None = None,
               labels: Sequence[str] | None = None, max_cell: int = 512) -> Image.Image:
    """One row per source (labelled with its name), one column per seed (headed by ``labels`` when
    given). ``boxes_by_source[source][column]`` lists that image's face boxes (x0, y0, x1, y1) in its
    own pixels, drawn as rectangles. Images larger than ``max_cell`` are scaled down (boxes with them);
    images of other sizes are centred in their cell; a missing image (None, or a shorter list) is a
    grey cell."""
    boxes_by_source = boxes_by_source or {}
    columns = max([len(images) for images in images_by_source.values()] + [len(labels or [])] + [1])
    cells = {source: [fitted(im, max_cell) if im is not None else None for im in images]
             for source, images in images_by_source.items()}
    present_cells = [c[0] for row in cells.values() for c in row if c is not None]
    cell_w = max([im.width for im in present_cells], default=64)
    cell_h = max([im.height for im in present_cells], default=64)

    font = default_font(max(12, cell_h // 24))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max([text_extent(measure, s, font)[0] for s in images_by_source] + [0]) + 2 * PAD
    header_h = (max(text_extent(measure, t, font)[1] for t in labels) + 2 * PAD) if labels else PAD
    grid = Image.new("RGB", (label_w + columns * (cell_w + PAD), header_h + len(cells) * (cell_h + PAD)), "white")
    draw = ImageDraw.Draw(grid)
    line = max(2, round(max(cell_w, cell_h) / 256))

    for c, text in enumerate(labels or []):
        draw.text((label_w + c * (cell_w + PAD), PAD), text, fill="black", font=font)
    for r, (source, row) in enumerate(cells.items()):
        top = header_h + r * (cell_h + PAD)
        draw.text((PAD, top + (cell_h - text_extent(draw, source, font)[1]) // 2), source, fill="black", font=font)
        boxes_row = boxes_by_source.get(source) or []
        for c in range(columns):
            x0, y0 = label_w + c * (cell_w + PAD), top
            cell = row[c] if c < len(row) else None
            if cell is None:
                draw.rectangle((x0, y0, x0 + cell_w - 1, y0 + cell_h - 1), fill=MISSING_COLOR)
                continue
            image, scale = cell
            ox, oy = x0 + (cell_w - image.width) // 2, y0 + (cell_h - image.height) // 2
            grid.paste(image, (ox, oy))
            for bx0, by0, bx1, by1 in (boxes_row[c] if c < len(boxes_row) and boxes_row[c] else []):
                draw.rectangle((ox + bx0 * scale, oy + by0 * scale, ox + bx1 * scale, oy + by1 * scale),
                               outline=BOX_COLOR, width=line)
    return grid


# ---- report.html --------------------------------------------------------------------------------

def png_data_uri(path: str | os.PathLike, max_width: int) -> str:
    """The PNG at ``path`` as a data URI, scaled down to ``max_width`` so that a report of many large
    grids stays a size a browser opens (the grid files themselves keep every pixel)."""
    with Image.open(path) as image:
        image.load()
        if image.width > max_width:
            image = image.resize((max_width, max(1, round(image.height * max_width / image.width))), Image.LANCZOS)
        return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def summary_cell(entry: Mapping, metric: str) -> str:
    """``mean [low, high]``, and for a source after the first the paired difference below it."""
    mean = entry.get(f"{metric}_mean")
    if mean is None:
        return "—"
    text = html.escape(format_interval(mean, entry.get(f"{metric}_low"), entry.get(f"{metric}_high")))
    if entry.get(f"{metric}_pairs"):
        diff = format_interval(entry[f"{metric}_diff"], entry[f"{metric}_diff_low"], entry[f"{metric}_diff_high"], sign=True)
        pairs = entry[f"{metric}_pairs"]
        text += f'<br><span class="diff">Δ {html.escape(diff)} · {pairs} pair{"s" if pairs > 1 else ""}</span>'
    return text


def summary_table(summary: Sequence[Mapping], metrics: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(m)}</th>" for m in ("source", "images", "with face", *metrics))
    body = []
    for entry in summary:
        cells = [html.escape(str(entry["source"])), str(entry["images"]), f"{entry['with_face']:.0%}"]
        cells += [summary_cell(entry, m) for m in metrics]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def step_points(rows: Iterable[Mapping], metric: str) -> list[tuple[int, float, float, float]]:
    """``(step, mean, low, high)`` of ``metric`` over the rows of each step, steps ascending; low and
    high are NaN where a step has one value."""
    by_step: dict[int, list] = {}
    for row in rows:
        if row.get("step") is not None:
            by_step.setdefault(int(row["step"]), []).append(row.get(metric))
    points = []
    for step in sorted(by_step):
        result = bootstrap_interval(by_step[step])
        if result is not None:
            points.append((step, *result))
    return points


def svg_plot(metric: str, points: Sequence[tuple[int, float, float, float]], width: int = 420, height: int = 220) -> str:
    """``metric``'s per-step mean as an inline SVG line chart: axes, step and value ticks, the mean as a
    polyline with dots, and its bootstrap interval as a shaded band where every step has one."""
    left, right, top, bottom = 60, 14, 24, 36
    steps = [p[0] for p in points]
    values = [v for p in points for v in p[1:] if present(v)]
    lo, hi = min(values), max(values)
    if hi == lo:  # a flat line still needs a y range
        lo, hi = lo - (abs(lo) or 1) * 0.05, hi + (abs(hi) or 1) * 0.05
    s0, s1 = min(steps), max(steps)

    def x(step):
        return left + (step - s0) / ((s1 - s0) or 1) * (width - left - right)

    def y(value):
        return top + (hi - value) / (hi - lo) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="plot">',
             f'<text x="{width / 2:.1f}" y="15" text-anchor="middle" font-weight="bold">{html.escape(metric)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>']
    if all(present(p[2]) and present(p[3]) for p in points):
        band = [(x(s), y(h)) for s, _, _, h in points] + [(x(s), y(low)) for s, _, low, _ in reversed(points)]
        parts.append(f'<polygon points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in band)}" fill="#4a7bd0" fill-opacity="0.2"/>')
    parts.append(f'<polyline points="{" ".join(f"{x(s):.1f},{y(m):.1f}" for s, m, _, _ in points)}" '
                 'fill="none" stroke="#1f4fa0" stroke-width="2"/>')
    parts += [f'<circle cx="{x(s):.1f}" cy="{y(m):.1f}" r="3" fill="#1f4fa0"/>' for s, m, _, _ in points]
    shown = steps if len(steps) <= 8 else [steps[round(i * (len(steps) - 1) / 5)] for i in range(6)]
    parts += [f'<text x="{x(s):.1f}" y="{height - bottom + 14}" text-anchor="middle" font-size="11">{s}</text>' for s in shown]
    parts.append(f'<text x="{(left + width - right) / 2:.1f}" y="{height - 4}" text-anchor="middle" font-size="11">step</text>')
    for value in (lo, (lo + hi) / 2, hi):
        parts.append(f'<text x="{left - 4}" y="{y(value) + 4:.1f}" text-anchor="end" font-size="11">'
                     f"{format_number(value, digits=2, scale=hi - lo)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def step_plots(rows: Sequence[Mapping], metrics: Sequence[str]) -> str:
    """One plot per measured metric when the rows carry at least two distinct steps (one step is no
    curve), else empty. The caller passes rows of one run's checkpoints: a step's mean pools its rows."""
    if len({row.get("step") for row in rows} - {None}) < 2:
        return ""
    plots = [svg_plot(m, points) for m in metrics if len(points := step_points(rows, m)) >= 1]
    return "<h2>Over training steps</h2><p>Mean per step, shaded: 95% bootstrap interval.</p>" + "".join(plots) if plots else ""


STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:100%}
table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right;vertical-align:top}
td:first-child,th:first-child{text-align:left}.diff{color:#555;font-size:90%}.verdict{font-weight:bold}
.warning{color:#a05000}.note{color:#a00000}figure{margin:1em 0}img{max-width:100%}.plot{margin:0 1em 1em 0}"""


def write_report_html(path: str | os.PathLike, summary: Sequence[Mapping], verdict_line: str,
                      grid_files: Sequence[str | os.PathLike], rows: Sequence[Mapping],
                      metrics: Sequence[str] = METRIC_COLUMNS, warning: str | None = None,
                      max_grid_width: int = 2048) -> Path:
    """report.html: the verdict, the underpowered ``warning`` if any, a note when no image has a face,
    the summary table (each metric's mean [95% interval] and, below it, the paired difference against
    the first source), the per-step plots when the rows carry steps, and the grids embedded as PNG
    data URIs (scaled to ``max_grid_width``)."""
    body = ["<h1>Did SAT help?</h1>", f'<p class="verdict">{html.escape(verdict_line)}</p>']
    if warning:
        body.append(f'<p class="warning">{html.escape(warning)}</p>')
    if not any(has_face(row) for row in rows):
        body.append(f'<p class="note">{NO_FACE_NOTE}</p>')
    body += ["<h2>Summary</h2>", "<p>Mean [95% bootstrap interval]; Δ: paired difference against "
             f"{html.escape(str(summary[0]['source'])) if summary else 'the first source'} over the images both measured.</p>",
             summary_table(summary, metrics), step_plots(rows, metrics)]
    if grid_files:
        body.append("<h2>Grids</h2>")
        body += [f'<figure><img src="{png_data_uri(f, max_grid_width)}" alt="{html.escape(Path(f).name)}">'
                 f"<figcaption>{html.escape(Path(f).name)}</figcaption></figure>" for f in grid_files]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>sat compare</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, page.encode("utf-8"))
