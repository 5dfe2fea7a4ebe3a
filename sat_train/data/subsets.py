"""Kohya's data model: a run's images come in subsets, each a folder of images with its repeat count,
whether it holds regularization images, and its class tokens (kohya-ss/sd-scripts' ``DreamBoothSubset``:
``image_dir``, ``num_repeats``, ``is_reg``, ``class_tokens``, ``caption_extension``). A ``--train_data_dir``
or ``--reg_data_dir`` of ``N_name/`` folders is one subset per folder (``folder_subset``); a --dataset_config
``[[datasets.subsets]]`` table is one subset each (config/dataset_config.py), with its own caption flags and
mask source; a diffusers ``--class_data_dir`` is one regularization subset captioned by ``--class_prompt``.

``balanced_repeats`` is kohya's balancing of regularization images against the training images.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# "10_sks woman" → 10 repeats (kohya-ss/sd-scripts' DreamBooth layout); a bare "10" repeats too
REPEATS_PREFIX = re.compile(r"^(\d+)(?:_|$)")


@dataclass(frozen=True)
class Subset:
    """One folder of images: each image is ``num_repeats`` samples an epoch; its caption is its same-stem
    ``caption_extension`` file, else ``class_tokens`` (None: an image without a caption file is skipped,
    sat's rule for training images); ``is_reg``: regularization images (kohya's prior loss weight)."""

    image_dir: Path
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    # a --dataset_config subset's own values (None: the run's flag): kohya's caption flags
    # (dataset.CaptionAugment) and its loss-mask source (data/masks.py)
    shuffle_caption: bool | None = None
    keep_tokens: int | None = None
    caption_dropout_rate: float | None = None
    caption_tag_dropout_rate: float | None = None
    alpha_mask: bool = False
    conditioning_data_dir: Path | None = None


def folder_subset(folder: Path, is_reg: bool, caption_extension: str) -> Subset | None:
    """The subset of an ``N_name`` folder as kohya reads it (``10_sks woman``: 10 repeats, class tokens
    "sks woman"; a bare ``10``: empty class tokens); None without an ``N`` prefix. Training folders carry no
    class tokens (a training image without its caption file is skipped instead of trained on the folder name);
    regularization folders do, as in kohya."""
    match = REPEATS_PREFIX.match(folder.name)
    if match is None:
        return None
    class_tokens = folder.name[match.end():] if is_reg else None
    return Subset(folder, int(match.group(1)), is_reg, class_tokens, caption_extension)


def balanced_repeats(repeats: list[int], num_train_images: int) -> list[int]:
    """Kohya's balancing (library/train_util.py, DreamBoothDataset): each regularization image's repeats an
    epoch, given each one's folder repeats (subset order, then file order) and the training images' count
    with repeats. First pass: images are taken in order with their folder's repeats until the total reaches
    ``num_train_images`` (the last one taken keeps all its repeats; the rest get 0: unused). Later passes:
    one more repeat to each taken image in turn, stopping as soon as the total reaches ``num_train_images``.
    No regularization images: nothing. The total thus equals ``num_train_images``, or exceeds it by less than
    the last taken image's folder repeats."""
    counts = [0] * len(repeats)
    if not repeats or sum(repeats) == 0:
        return counts
    total, taken = 0, 0
    for i, n in enumerate(repeats):  # the first pass
        if total >= num_train_images:
            break
        counts[i], total, taken = n, total + n, i + 1
    while total < num_train_images:  # the later passes
        for i in range(taken):
            counts[i] += 1
            total += 1
            if total >= num_train_images:
                break
    return counts
