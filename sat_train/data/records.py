"""The run's records: (image, caption) pairs and a name per record for messages, read before any
model loads so that data problems show in seconds.

Sources: an image folder with metadata.jsonl or a kohya-style folder (``N_name/`` subfolders, same-stem
caption files), both through the data check (datacheck.py: every problem listed in one pass); or,
with ``--dataset_name`` (as in diffusers' train_text_to_image_lora.py), the "train" split of
``datasets.load_dataset``: captions up front (checked), images lazily per sample (dataset.DatasetRow).
A caption column holding lists of captions gives a record a tuple of captions (the dataset picks one
per epoch). Every problem the user can fix raises UsageError naming the file and what to do.

A folder's records come with each image's size as the data check read it (``Records.sizes``), which the
buckets and the latent cache use instead of opening every image again. Under several processes the
main process alone checks a folder (and prints the check); the others get its ``Records`` through one
broadcast (``read_run_records``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UsageError
from .datacheck import SmallImageRule, scan_image_folder, scan_subsets
from .dataset import DatasetRow
from .main_process import from_main_process

if TYPE_CHECKING:
    from ..config.settings import TrainConfig


def read_hf_dataset(config: TrainConfig) -> tuple[list[tuple[object, str | tuple[str, ...]]], list[str]]:
    """(DatasetRow, caption) records of the "train" split; a caption is a string, or a tuple of strings
    when the caption column holds lists (CaptionedImages picks one per epoch)."""
    try:
        import datasets
    except ImportError:
        raise UsageError("--dataset_name needs the datasets package: pip install datasets") from None
    dataset = load_train_split(datasets, config)
    check_columns(datasets, dataset, config)
    if len(dataset) == 0:
        raise UsageError(f"--dataset_name {config.dataset_name}: its \"train\" split has no rows")
    if not dataset.features[config.image_column].decode:  # rows would be {"bytes", "path"} dicts
        dataset = dataset.cast_column(config.image_column, datasets.Image())
    images = dataset.select_columns([config.image_column])
    # the caption column alone: reading it decodes no image
    captions = [check_caption(config, row, caption) for row, caption in enumerate(dataset[config.caption_column])]
    records = [(DatasetRow(images, config.image_column, row), caption) for row, caption in enumerate(captions)]
    return records, [f"row {row} of --dataset_name {config.dataset_name}" for row in range(len(records))]


def load_train_split(datasets, config: TrainConfig):
    what = f"--dataset_name {config.dataset_name}" + (
        f" --dataset_config_name {config.dataset_config_name}" if config.dataset_config_name else "")
    try:
        splits = datasets.load_dataset(config.dataset_name, config.dataset_config_name,
                                       cache_dir=config.cache_dir, data_dir=config.train_data_dir)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        # not found, offline, no data files, unknown config, files that disagree: all fixable, so one
        # line instead of a traceback; datasets often puts the real reason in the chained error
        reason = one_line(err) + (f" ({one_line(err.__cause__)})" if err.__cause__ is not None else "")
        raise UsageError(f"cannot load {what}: {reason} (expected a hub dataset name, reachable or in "
                         "--cache_dir, or a folder of parquet/csv/json files or of images with metadata.jsonl; "
                         "for an image folder also --dataset_name imagefolder --train_data_dir FOLDER)") from err
    if "train" not in splits:
        raise UsageError(f"{what} has no \"train\" split (splits: {', '.join(splits) or 'none'}); the trainer reads "
                         "\"train\": in a local folder name the files train.* or put them in a train/ subfolder")
    return splits["train"]


def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_columns(datasets, dataset, config: TrainConfig) -> None:
    columns = ", ".join(dataset.column_names)
    for flag, column in (("--image_column", config.image_column), ("--caption_column", config.caption_column)):
        if column not in dataset.column_names:
            raise UsageError(f"dataset {config.dataset_name} has no column {column!r} "
                             f"(columns: {columns}); pass {flag}")
    feature = dataset.features[config.image_column]
    if not isinstance(feature, datasets.Image):
        raise UsageError(f"--image_column {config.image_column} of dataset {config.dataset_name} holds {feature}, "
                         f"not images (columns: {columns}); pass --image_column naming an image column")


def check_caption(config: TrainConfig, row: int, caption) -> str | tuple[str, ...]:
    """A string, or a non-empty list of strings (returned as a tuple). Anything else stops the run
    before a model loads, as diffusers' example does: a null would otherwise train on "None"."""
    if isinstance(caption, str):
        return caption
    if isinstance(caption, (list, tuple, np.ndarray)) and len(caption) and all(isinstance(c, str) for c in caption):
        return tuple(caption)
    shown = repr(caption) if len(repr(caption)) <= 60 else repr(caption)[:57] + "..."
    raise UsageError(f"row {row} of --dataset_name {config.dataset_name}: --caption_column {config.caption_column} "
                     f"holds {shown}, not a caption (a string or a non-empty list of strings); fix the row, "
                     "or pass --caption_column naming a text column")


@dataclass
class Records:
    """The run's (image, caption) records, a name per record for messages, and each record's image
    (width, height) as the data check read it; ``sizes`` is None for --dataset_name rows (no check:
    their sizes are read when the buckets or the latent cache need them)."""

    records: list[tuple[object, str | tuple[str, ...]]]
    names: list[str]
    sizes: list[tuple[int, int]] | None = None
    subsets: list | None = None  # --dataset_config: each record's subsets.Subset (its caption flags and mask)


def read_records(config: TrainConfig, data_dir: Path | None = None, quiet: bool = False
                 ) -> tuple[list[tuple[object, str | tuple[str, ...]]], list[str]]:
    """(image, caption) records and a name per record for messages: ``collect_records`` without the sizes."""
    found = collect_records(config, data_dir, quiet)
    return found.records, found.names


def read_run_records(config: TrainConfig, accelerator, data_dir: Path | None = None) -> Records:
    """The run's Records on every process. A folder is checked once, by the main process, which prints
    the check; the others receive its Records (or its data problem, raised alike) through one broadcast
    instead of scanning the folder again. --dataset_name rows hold the dataset itself (no check, no
    sizes): every process loads it, as before."""
    if config.dataset_name is not None and data_dir is None:
        return collect_records(config)
    return from_main_process(accelerator, "checking the data", lambda: collect_records(config, data_dir))


def collect_records(config: TrainConfig, data_dir: Path | None = None, quiet: bool = False) -> Records:
    """The Records of --train_data_dir (through the data check) or --dataset_name; runs before any model
    loads, so data problems show in seconds. ``data_dir`` overrides --train_data_dir (the demo's photos).
    ``quiet``: the data check prints nothing; errors still raise."""
    sizes, subsets = None, None
    if config.dataset_name is not None and data_dir is None:
        records, names = read_hf_dataset(config)
    elif config.dataset_config is not None and data_dir is None:
        report = scan_subsets(Path(config.dataset_config), [s for s in config.dataset_subsets if not s.is_reg],
                              **data_check_rules(config), quiet=quiet)
        records, names, sizes, subsets = report.records, report.names, report.sizes, record_subsets(report)
    else:
        # the data check (datacheck.py): every problem listed in one pass, fatal ones exit 2 here
        report = scan_image_folder(Path(data_dir or config.train_data_dir), config.image_column,
                                   config.caption_column, **data_check_rules(config), quiet=quiet,
                                   caption_suffix=config.caption_suffix)
        records, names, sizes = report.records, report.names, report.sizes
    if config.max_train_samples is not None:
        records, names = records[: config.max_train_samples], names[: config.max_train_samples]
        sizes = sizes[: config.max_train_samples] if sizes is not None else None
        subsets = subsets[: config.max_train_samples] if subsets is not None else None
    return Records(records, names, sizes, subsets)


def data_check_rules(config: TrainConfig) -> dict:
    """The data check's size rule and strictness from the flags (datacheck.scan_* keyword arguments)."""
    (width, height), size_flag = config.small_image_size
    no_upscale = config.enable_bucket and config.bucket_no_upscale
    small = SmallImageRule(width, height, size_flag, "--bucket_no_upscale" if no_upscale else "--skip_small_images")
    return dict(resolution=small, skip_small_images=config.skip_small_images or no_upscale, strict=config.strict_data)


def record_subsets(report) -> list:
    """Each record's subset, from a subsets' data check (``DataReport.usable``: each image's first record)."""
    subsets = []
    for first, subset in report.usable:
        subsets += [subset] * subset.num_repeats
    return subsets


def kohya_dataset_metadata(train: Records, reg_records: list = ()) -> dict[str, str]:
    """Kohya's ss_* keys of the images, as train_network.py writes them: ``ss_num_train_images`` (the training
    samples with repeats), ``ss_dataset_dirs`` ({folder name: {"n_repeats", "img_count"}}) and
    ``ss_tag_frequency`` ({folder name: {tag: images whose caption holds it}}, lower-cased comma-separated tags,
    the regularization images' folders too), which A1111's metadata viewer shows. --dataset_name rows have
    no folder: only the count."""
    values = {"ss_num_train_images": str(len(train.records))}
    folders = image_folders(train.records)
    if folders is not None:
        values["ss_dataset_dirs"] = json.dumps({name: {"n_repeats": info["n_repeats"], "img_count": len(info["images"])}
                                               for name, info in folders.items()})
        tags = image_folders([*train.records, *reg_records])
        values["ss_tag_frequency"] = json.dumps({name: tag_frequency(info["images"].values())
                                                 for name, info in tags.items()})
    return values


def image_folders(records: list) -> dict | None:
    """{folder name: {"n_repeats": the records of its first image, "images": {image: caption}}} of file
    records, each image once; None when a record is no file (a --dataset_name row)."""
    folders: dict[str, dict] = {}
    counts: dict[Path, int] = {}
    for source, caption in records:
        if not isinstance(source, (str, Path)):
            return None
        counts[Path(source)] = counts.get(Path(source), 0) + 1
        folders.setdefault(Path(source).parent.name, {"images": {}})["images"][Path(source)] = caption
    for info in folders.values():
        info["n_repeats"] = counts[next(iter(info["images"]))]
    return folders


def tag_frequency(captions) -> dict[str, int]:
    """Kohya's set_tag_frequency: each caption's comma-separated tags, stripped and lower-cased, counted."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in (caption if isinstance(caption, str) else ", ".join(caption)).split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def check_dataset_flags(config) -> None:
    if config.dataset_config is not None and config.dataset_name is not None:
        raise UsageError("--dataset_config and --dataset_name both name the training images: keep one")
    if config.dataset_name is not None and (config.strict_data or config.skip_small_images):
        raise UsageError("--strict_data and --skip_small_images act on the image-folder data check, which "
                         "--dataset_name does not run (its images are decoded per sample); drop them, or "
                         "give the folder as --train_data_dir without --dataset_name")
