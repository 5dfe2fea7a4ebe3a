"""--sample_metrics: the face metrics of every image a training run samples (``--sample_prompts`` and
``--validation_prompt``), so that face quality and likeness can be followed over steps and a checkpoint
picked on them.

``SampleMetrics`` is built once per run on the main process (the scorer's models and the reference
embedding load once); the sampling code in ``outputs/samples.py`` hands it each sampling step's images
through a plain callable (``outputs`` sits below ``evaluate`` and imports nothing of it). Each call
appends one row per image to ``OUTPUT_DIR/samples/metrics.csv`` (the whole file rewritten atomically
from the rows so far, so a crash never leaves half a file) and logs the step's means to the trackers
as ``face/<source>/<metric>``: each metric's mean over the images that have a value, and
``face/<source>/with_face``, the share of images with a face.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from ..data.main_process import from_main_process
from ..errors import UsageError
from .faces import require
from .metrics import FaceScorer, reference_files
from .report import write_metrics_csv
from .stats import METRIC_COLUMNS, has_face, present

METRICS_NAME = "metrics.csv"  # in OUTPUT_DIR/samples/, beside the --sample_prompts images
MEAN_METRICS = METRIC_COLUMNS[1:]  # "faces" (a count) is logged as the share of images with a face


def step_means(rows: Sequence[Mapping], source: str) -> dict[str, float]:
    """The trackers' values of one sampling step's ``rows``: ``face/<source>/with_face`` and the mean of
    each metric over the rows that have it (a metric no image has is left out, not logged as 0)."""
    logs = {f"face/{source}/with_face": sum(has_face(row) for row in rows) / len(rows)}
    for metric in MEAN_METRICS:
        values = [float(row[metric]) for row in rows if present(row.get(metric))]
        if values:
            logs[f"face/{source}/{metric}"] = sum(values) / len(values)
    return logs


def rows_up_to(path: Path, step: int) -> list[dict]:
    """The rows of an earlier metrics.csv with ``step`` <= ``step``, as the text they were written with
    (rewritten unchanged); none when there is no file."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as file:
        return [row for row in csv.DictReader(file) if row.get("step") and int(row["step"]) <= step]


class SampleMetrics:
    """``metrics(step, source, images)``: scores ``images``, an iterable of ``(file, prompt_index, seed,
    PIL image)`` (``file`` relative to the output folder, ``seed`` None where unknown) sampled at
    ``step`` for ``source`` ("samples" or "validation"); writes metrics.csv and logs the means through
    ``log(values, step=step)`` (accelerate's ``Accelerator.log``). ``scorer`` maps an image to
    ``(row, faces)`` as ``FaceScorer`` does."""

    def __init__(self, path: str | Path, scorer: Callable, log: Callable[..., None]):
        self.path, self.scorer, self.log = Path(path), scorer, log
        self.rows: list[dict] = []

    @classmethod
    def for_run(cls, config, accelerator) -> SampleMetrics | None:
        """The run's scorer with --reference_images' embedding (main process), or None without
        --sample_metrics or on the other processes, which never sample."""
        if not config.sample_metrics:
            return None
        scorers = []

        def load() -> None:  # returns nothing: the scorer (models, embedding) stays on the main process
            scorers.append(FaceScorer(config.reference_images,
                                      warn=lambda line: accelerator.print(f"warning: {line}")))

        # reference photos without a face stop every process together (data.main_process), not the main one alone
        from_main_process(accelerator, "reading --reference_images", load)
        return cls(Path(config.output_dir) / "samples" / METRICS_NAME, scorers[0], accelerator.log) if scorers else None

    def resume(self, step: int) -> None:
        """A run resumed at ``step`` keeps the rows written up to it; later ones (sampled after that
        checkpoint by the interrupted run) are dropped, since the resumed run samples those steps again."""
        self.rows = rows_up_to(self.path, step)

    def __call__(self, step: int, source: str, images: Iterable[tuple]) -> list[dict]:
        rows = [self.score(step, source, *image) for image in images]
        if not rows:
            return rows
        self.rows += rows
        write_metrics_csv(self.path, self.rows)
        self.log(step_means(rows, source), step=step)
        return rows

    def score(self, step: int, source: str, file: str, prompt_index: int, seed: int | None, image) -> dict:
        row, _ = self.scorer(image)
        return {"step": step, "source": source, "file": file, "prompt_index": prompt_index, "seed": seed, **row}


def check_sample_metrics_flags(config) -> None:
    """--sample_metrics and --reference_images, before models load: something to score, the extras
    installed, a folder of images to compare faces with."""
    if config.reference_images is not None and not config.sample_metrics:
        raise UsageError(f"--reference_images {config.reference_images} gives the identity column of "
                         "--sample_metrics: add --sample_metrics, or drop --reference_images")
    if not config.sample_metrics:
        return
    if not config.sample_prompts and not config.validation_prompt:  # an empty --validation_prompt never samples
        raise UsageError("--sample_metrics scores the images of --sample_prompts FILE or --validation_prompt "
                         "TEXT: give one of them")
    require_extra("--sample_metrics", "eval")
    if config.reference_images is not None:
        reference_files(config.reference_images)  # a missing folder or one without images stops here
        require_extra("--reference_images", "identity")


def require_extra(flag: str, feature: str) -> None:
    """``faces.require``, its one line prefixed with the flag that needs the extra."""
    try:
        require(feature)
    except UsageError as err:
        raise UsageError(f"{flag}: {err}") from None
