"""The statistics of ``python -m sat_train.compare``: per-source means with percentile-bootstrap
intervals, paired differences against the first source, and the one-line verdict.

Images pair across sources by their ``file`` name (generated sources name them by prompt and seed),
so a difference is measured on the same prompts and seeds: the paired interval is much narrower than
comparing two independent means when prompts and seeds vary more than the sources do.

Missing values (``None`` or NaN: no face, no reference images) are left out of every mean and pair.

The bootstrap's random-number contract (tests rebuild it independently): for ``n`` values ``v`` in the
order given, ``idx = numpy.random.default_rng(seed).integers(0, n, size=(resamples, n))``, the
resample means are ``v[idx].mean(axis=1)`` and the interval is ``numpy.quantile`` of those means at
``(1 - level) / 2`` and ``(1 + level) / 2`` (numpy's default linear method). The draw is made in row
chunks to bound memory; numpy's generator gives the same numbers either way."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

# The metric columns of metrics.csv, in order (metrics.FaceScorer's row holds them).
METRIC_COLUMNS = ("faces", "face_score", "face_sharpness", "eye_sharpness", "eye_balance", "identity")
# The metrics the verdict ranks: higher is better for each. "faces" (a count) is left out: more faces
# in a portrait is not better.
VERDICT_METRICS = METRIC_COLUMNS[1:]
# Bootstrap index draws are made in chunks of about this many indices (8 bytes each) at a time.
CHUNK_INDICES = 1 << 20


class Paired(NamedTuple):
    """A paired difference ``other - first`` over the files both have a value for."""
    pairs: int
    mean: float | None
    low: float | None
    high: float | None


def present(value) -> bool:
    """True for a measured value: not None and not NaN."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def bootstrap_interval(values: Iterable, level: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float, float] | None:
    """``(mean, low, high)``: the mean of the measured values and its percentile-bootstrap interval at
    ``level``, deterministic for ``seed`` (the contract is in the module docstring). ``None`` when no
    value is measured. One value gives ``(value, nan, nan)``: every resample of one value is that value,
    and a zero-width interval would claim a certainty one image cannot give."""
    sample = np.array([float(v) for v in values if present(v)], dtype=np.float64)
    if sample.size == 0:
        return None
    mean = float(sample.mean())
    if sample.size == 1:
        return mean, math.nan, math.nan
    means = resample_means(sample, resamples, seed)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return mean, float(low), float(high)


def resample_means(sample: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """The means of ``resamples`` bootstrap resamples of ``sample``, drawn in row chunks."""
    n = sample.size
    rng = np.random.default_rng(seed)
    rows = max(1, CHUNK_INDICES // n)
    parts = []
    for start in range(0, resamples, rows):
        idx = rng.integers(0, n, size=(min(rows, resamples - start), n))
        parts.append(sample[idx].mean(axis=1))
    return np.concatenate(parts)


def paired_difference(first: Mapping[str, object], other: Mapping[str, object], level: float = 0.95,
                      resamples: int = 2000, seed: int = 0) -> Paired:
    """The mean of ``other[f] - first[f]`` over the files ``f`` both measured, and its bootstrap
    interval. Files are taken in sorted order, so the result does not depend on the dicts' order."""
    files = sorted(f for f in first.keys() & other.keys() if present(first[f]) and present(other[f]))
    result = bootstrap_interval([float(other[f]) - float(first[f]) for f in files], level, resamples, seed)
    if result is None:
        return Paired(0, None, None, None)
    return Paired(len(files), *result)


def by_source(rows: Iterable[Mapping]) -> dict[str, list[Mapping]]:
    """The rows grouped by ``source``, sources in first-appearance order."""
    groups: dict[str, list[Mapping]] = {}
    for row in rows:
        groups.setdefault(row["source"], []).append(row)
    return groups


def values_by_file(rows: Sequence[Mapping], metric: str) -> dict[str, object]:
    """``{file: value}`` of one source's rows; a file twice in one source would pair wrongly, so it stops."""
    found: dict[str, object] = {}
    for row in rows:
        if row["file"] in found:
            raise ValueError(f"source {row['source']!r} has two images named {row['file']!r}")
        found[row["file"]] = row.get(metric)
    return found


def has_face(row: Mapping) -> bool:
    return present(row.get("faces")) and row["faces"] >= 1


def summary_columns(metrics: Sequence[str] = METRIC_COLUMNS) -> list[str]:
    """The columns of summary.csv, in order (the first source leaves the ``diff`` and ``pairs`` ones empty)."""
    columns = ["source", "images", "with_face"]
    for m in metrics:
        columns += [f"{m}_mean", f"{m}_low", f"{m}_high", f"{m}_diff", f"{m}_diff_low", f"{m}_diff_high",
                    f"{m}_pairs"]
    return columns


def summarize(rows: Iterable[Mapping], metrics: Sequence[str] = METRIC_COLUMNS, level: float = 0.95,
              resamples: int = 2000, seed: int = 0) -> list[dict]:
    """One dict per source, in first-appearance order: ``source``, ``images``, ``with_face`` (share of
    images with at least one face), per metric ``<m>_mean/_low/_high`` (None when nothing was measured)
    and, for every source after the first, ``<m>_diff/_diff_low/_diff_high/_pairs``: the paired
    difference (this source minus the first) over the files both measured."""
    groups = by_source(rows)
    summary = []
    baseline = None
    for source, group in groups.items():
        entry: dict = {"source": source, "images": len(group),
                       "with_face": sum(has_face(r) for r in group) / len(group)}
        values = {m: values_by_file(group, m) for m in metrics}
        for m in metrics:
            mean, low, high = bootstrap_interval(values[m].values(), level, resamples, seed) or (None, None, None)
            entry.update({f"{m}_mean": mean, f"{m}_low": low, f"{m}_high": high})
        if baseline is not None:
            for m in metrics:
                diff = paired_difference(baseline[m], values[m], level, resamples, seed)
                entry.update({f"{m}_diff": diff.mean, f"{m}_diff_low": diff.low, f"{m}_diff_high": diff.high,
                              f"{m}_pairs": diff.pairs})
        else:
            baseline = values
        summary.append(entry)
    return summary


def format_number(value, digits: int = 3, scale: float | None = None) -> str:
    """``value`` with ``digits`` significant digits of ``scale`` (default: the value itself), never in
    exponent form: 12.345 → "12.3", 0.012345 → "0.0123", 1234.5 → "1234"; empty for None, "nan" for NaN."""
    if not present(value):
        return "" if value is None else "nan"
    scale = abs(value) if scale is None else abs(scale)
    decimals = 0 if scale == 0 or not math.isfinite(scale) else max(0, digits - 1 - math.floor(math.log10(scale)))
    return f"{value:.{decimals}f}"


def format_interval(value, low, high, sign: bool = False) -> str:
    """``"12.3 [4.1, 20.5]"`` (``"+12.3 [...]"`` with ``sign``), all three with the decimals of the largest."""
    finite = [abs(v) for v in (value, low, high) if present(v) and math.isfinite(v)]
    scale = max(finite) if finite else None
    text = format_number(value, scale=scale)
    if sign and present(value) and value >= 0:
        text = "+" + text
    if not (present(low) and present(high)):
        return text
    return f"{text} [{format_number(low, scale=scale)}, {format_number(high, scale=scale)}]"


def metric_verdict(entry: Mapping, baseline: str, metric: str) -> str:
    """One metric of one source against the first, e.g. ``"face_sharpness +12.3 [4.1, 20.5] sat ahead
    (interval excludes 0)"``."""
    pairs = entry[f"{metric}_pairs"]
    diff, low, high = entry[f"{metric}_diff"], entry[f"{metric}_diff_low"], entry[f"{metric}_diff_high"]
    leader = f"{entry['source']} ahead" if diff > 0 else f"{baseline} ahead" if diff < 0 else "even"
    text = f"{metric} {format_interval(diff, low, high, sign=True)} {leader}"
    if not (present(low) and present(high)):
        return f"{text} ({pairs} pair, no interval)"
    excludes = low > 0 or high < 0
    return f"{text} (interval {'excludes' if excludes else 'includes'} 0)"


def verdict(summary: Sequence[Mapping], metrics: Sequence[str] = VERDICT_METRICS, level: float = 0.95) -> str:
    """ONE line: for each source after the first, each metric's paired difference against the first
    source, which one is ahead and whether the interval excludes zero; metrics without pairs are left
    out. Higher is better for every metric listed (``faces``, a count, is not among the defaults for that reason)."""
    if len(summary) < 2:
        only = summary[0]["source"] if summary else "nothing"
        return f"one source ({only}): nothing to compare"
    baseline = summary[0]["source"]
    parts = []
    for entry in summary[1:]:
        # a metric no pair measured (identity without reference images, any face metric without faces)
        # has nothing to say
        said = [metric_verdict(entry, baseline, m) for m in metrics if entry.get(f"{m}_pairs")]
        parts.append(f"{entry['source']} vs {baseline}: {', '.join(said) or 'no metric measured on both'}")
    return f"{'; '.join(parts)} (difference = source - {baseline}, {level:.0%} bootstrap interval; higher is better)"


def paired_images(entry: Mapping, metrics: Sequence[str]) -> int:
    """The images a source shares with the first on its best-covered metric (``faces`` is measured on
    every image, so with it listed this is the number of images both sources have)."""
    return max((entry.get(f"{m}_pairs") or 0 for m in metrics), default=0)


def underpowered(summary: Sequence[Mapping], minimum: int = 20, metrics: Sequence[str] = METRIC_COLUMNS) -> str | None:
    """A warning line when a source shares fewer than ``minimum`` paired images with the first one:
    with so few, an interval is wide and a lead on one metric is often chance. None otherwise."""
    few = [(entry["source"], paired_images(entry, metrics)) for entry in summary[1:]]
    few = [(source, n) for source, n in few if n < minimum]
    if not few:
        return None
    listed = ", ".join(f"{source} ({n})" for source, n in few)
    return (f"warning: underpowered comparison: fewer than {minimum} paired images with {summary[0]['source']} "
            f"for {listed}; render more prompts or seeds before trusting a difference")
