"""Regularization images (prior preservation): kohya's ``--reg_data_dir`` (``N_class/`` folders) or diffusers'
``--class_data_dir`` (one folder captioned by ``--class_prompt``), read through the data check as subsets
(subsets.Subset, is_reg) and balanced against the training images as kohya balances them
(subsets.balanced_repeats); their samples follow the training samples in the run's records, and each
sample's flag travels in its batch under ``dataset.IS_REG`` (dataset.CaptionedImages.is_reg).

What a regularization sample changes in a step lives elsewhere: its loss weight (--prior_loss_weight,
run/inputs.py), its target (--prior_target base, guide/prior.py) and its SAT guidance (--guide_reg_samples,
guide/guidance.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from .datacheck import IMAGE_SUFFIXES, DataReport, scan_kohya_folder, scan_subsets
from .main_process import from_main_process
from .records import Records, data_check_rules
from .subsets import Subset, balanced_repeats

if TYPE_CHECKING:
    from ..config.settings import TrainConfig

@dataclass
class RegImages:
    """The checked regularization images (each once, in subset then file order) with each one's subset, and
    what kohya's metadata says of them."""

    records: list[tuple[Path, str]]
    names: list[str]
    sizes: list[tuple[int, int]]
    subsets: list[Subset]
    folders: dict[str, dict[str, int]] = field(default_factory=dict)  # kohya's ss_reg_dataset_dirs

    @property
    def num_reg_images(self) -> int:
        """Kohya's ss_num_reg_images: the images times their folder's repeats, before balancing."""
        return sum(subset.num_repeats for subset in self.subsets)


def uses_regularization(config: TrainConfig) -> bool:
    return (config.reg_data_dir is not None or config.with_prior_preservation
            or any(subset.is_reg for subset in config.dataset_subsets or ()))


def reg_subsets_root(config: TrainConfig) -> Path:
    return Path(config.reg_data_dir if config.reg_data_dir is not None else config.class_data_dir)


def read_reg_images(config: TrainConfig, quiet: bool = False) -> RegImages:
    """--reg_data_dir's ``N_class/`` folders (an image without its caption file takes its folder's class
    tokens), --dataset_config's is_reg subsets, or --class_data_dir as one subset of 1 repeat captioned by
    --class_prompt; through the data check."""
    common = dict(**data_check_rules(config), quiet=quiet)
    if config.dataset_config is not None:
        reg = [subset for subset in config.dataset_subsets if subset.is_reg]
        return reg_images_of(scan_subsets(Path(config.dataset_config), reg, **common))
    root = reg_subsets_root(config)
    if config.reg_data_dir is not None:
        report = scan_kohya_folder(root, config.caption_suffix, is_reg=True, **common)
    else:
        report = scan_subsets(root, [Subset(root, 1, True, config.class_prompt, config.caption_suffix)], **common)
    return reg_images_of(report)


def reg_images_of(report: DataReport) -> RegImages:
    """The regularization images of a subsets' data check (``report.usable``: subsets with ``is_reg``), each
    once; a dataset config's mixed report gives its regularization subsets' images."""
    usable = [(first, subset) for first, subset in report.usable if subset.is_reg]
    folders: dict[str, dict[str, int]] = {}
    for _, subset in usable:  # kohya's ss_reg_dataset_dirs: {folder name: {"n_repeats", "img_count"}}
        entry = folders.setdefault(os.path.basename(subset.image_dir), {"n_repeats": subset.num_repeats,
                                                                         "img_count": 0})
        entry["img_count"] += 1
    return RegImages([report.records[i] for i, _ in usable], [str(report.records[i][0]) for i, _ in usable],
                     [report.sizes[i] for i, _ in usable], [subset for _, subset in usable], folders)


def read_run_reg_images(config: TrainConfig, accelerator) -> RegImages | None:
    """The run's regularization images on every process (checked once, by the main process); None without."""
    if not uses_regularization(config):
        return None
    return from_main_process(accelerator, "checking the regularization images", lambda: read_reg_images(config))


def with_regularization(train: Records, reg: RegImages | None) -> tuple[Records, list[bool] | None]:
    """The training records followed by the regularization samples, each image repeated as kohya balances
    them against the training samples (subsets.balanced_repeats); and each record's is-regularization flag
    (None without regularization images)."""
    if reg is None:
        return train, None
    counts = balanced_repeats([subset.num_repeats for subset in reg.subsets], len(train.records))
    records, names, sizes = list(train.records), list(train.names), train.sizes
    sizes = None if sizes is None else list(sizes)
    subsets = None if train.subsets is None else list(train.subsets)
    for record, name, size, subset, count in zip(reg.records, reg.names, reg.sizes, reg.subsets, counts):
        records += [record] * count
        names += [f"{name} (regularization, x{count} an epoch)"] * count
        if sizes is not None:
            sizes += [size] * count
        if subsets is not None:
            subsets += [subset] * count
    flags = [False] * len(train.records) + [True] * (len(records) - len(train.records))
    return Records(records, names, sizes, subsets), flags


def reg_metadata(reg: RegImages | None, config: TrainConfig) -> dict[str, str]:
    """Kohya's ss_* keys of regularization images, as train_network.py writes them (ss_reg_dataset_dirs a JSON
    object, ss_num_reg_images the count with repeats before balancing), and sat's own settings."""
    values = {"ss_prior_loss_weight": str(config.prior_loss_weight),
              "ss_num_reg_images": str(0 if reg is None else reg.num_reg_images),
              "ss_reg_dataset_dirs": json.dumps({} if reg is None else reg.folders)}
    if reg is not None:
        values.update(sat_prior_target=config.prior_target, sat_guide_reg_samples=str(config.guide_reg_samples))
    return values


def check_regularization_flags(config) -> None:
    """Before any model loads: the flags fit together, and the folders exist and hold what they should."""
    default_weight = type(config).__dataclass_fields__["prior_loss_weight"].default
    if not config.prior_loss_weight >= 0:  # also nan
        raise UsageError(f"--prior_loss_weight must be >= 0 (the loss weight of regularization samples), got "
                         f"{config.prior_loss_weight}")
    if config.with_prior_preservation:
        for flag in ("class_data_dir", "class_prompt"):
            if getattr(config, flag) is None:
                raise UsageError(f"--with_prior_preservation needs --{flag} (e.g. --class_data_dir class_images "
                                 "--class_prompt \"a photo of a woman\")")
        if config.num_class_images < 1:
            raise UsageError(f"--num_class_images must be >= 1, got {config.num_class_images}")
        if config.reg_data_dir is not None:
            raise UsageError("--reg_data_dir and --with_prior_preservation both give regularization images: keep "
                             "one (kohya's N_class/ folders, or diffusers' --class_data_dir)")
        check_class_folder(Path(config.class_data_dir))
    else:
        for flag in ("class_data_dir", "class_prompt"):
            if getattr(config, flag) is not None:
                raise UsageError(f"--{flag} is read with --with_prior_preservation: add it, or drop --{flag}")
    if config.reg_data_dir is not None:
        folder = Path(config.reg_data_dir)
        if not folder.is_dir():
            raise UsageError(f"--reg_data_dir {folder} is not a folder: give the folder of kohya-style N_class/ "
                             "subfolders of regularization images (e.g. reg/1_woman/img001.png)")
        if not any(entry.is_dir() and not entry.name.startswith(".") for entry in folder.iterdir()):
            raise UsageError(f"--reg_data_dir {folder} holds no subfolders: put the regularization images in "
                             f"kohya-style N_class/ subfolders (e.g. {folder / '1_woman' / 'img001.png'})")
    if not uses_regularization(config):
        if config.prior_loss_weight != default_weight:
            raise UsageError("--prior_loss_weight weights regularization images, and there are none: add "
                             "--reg_data_dir (or --with_prior_preservation), or drop --prior_loss_weight")
        if config.prior_target != "data":
            raise UsageError(f"--prior_target {config.prior_target} sets the target of regularization images, and "
                             "there are none: add --reg_data_dir (or --with_prior_preservation), or drop it")
        if config.guide_reg_samples:
            raise UsageError("--guide_reg_samples guides regularization images, and there are none: add "
                             "--reg_data_dir (or --with_prior_preservation), or drop --guide_reg_samples")
    if config.prior_target == "base" and config.train_text_encoder:
        raise UsageError("--prior_target base predicts with every LoRA off, but --train_text_encoder's captions are "
                         "encoded with theirs on: drop one of them")
    if uses_regularization(config) and config.dataset_name is not None:
        raise UsageError("regularization images (--reg_data_dir, --with_prior_preservation) are balanced against "
                         "an image folder's samples; give the training images as --train_data_dir, not --dataset_name")


def check_class_folder(folder: Path) -> None:
    """--class_data_dir: a folder (created when missing) of images only; generated images go there."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--class_data_dir {folder} is a file: give a folder (created when missing) for the "
                         "class images")
    if not folder.is_dir():
        return
    others = sorted(entry.name for entry in folder.iterdir()
                    if not entry.name.startswith(".") and (entry.is_dir() or entry.suffix.lower() not in IMAGE_SUFFIXES))
    if others:
        raise UsageError(f"--class_data_dir {folder} holds {others[0]}" + (f" and {len(others) - 1} more"
                                                                            if len(others) > 1 else "")
                         + f", not an image ({', '.join(sorted(IMAGE_SUFFIXES))}): class images go in a folder of "
                         "their own; move the rest out")
