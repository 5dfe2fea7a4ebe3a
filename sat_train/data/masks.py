"""Loss masks (--masked_loss; kohya-ss/sd-scripts' flags and layout): where each image's mask comes from,
their check before any model loads, and each sample's mask through its image's transform.

Sources, one per run:
- ``--conditioning_data_dir DIR``: a mask image per training image, same stem, any image suffix; found at
  the image's place relative to the data folder (``DIR/10_name/img.png`` for ``--train_data_dir``'s
  ``10_name/img.jpg``, ``DIR/sub/img.png`` for a metadata.jsonl ``file_name`` ``sub/img.jpg``), else flat
  (``DIR/img.png``). Its R channel / 255 is the mask, as kohya reads a conditioning image (a grayscale
  mask's R is its gray).
- ``--alpha_mask``: the image's own alpha channel / 255 (kohya's flag; like kohya it turns the masked loss on).
- ``--face_masks``: files written by run/face_masks.py under OUTPUT_DIR/face_masks/, then read as a
  --conditioning_data_dir.

A sample's mask goes through the same resize, crop and flip as its image (``ImageTransform.warp`` with the
sample's ``Geometry``, the image's resize filter, as kohya resizes a conditioning image); with a latent cache
it takes the cached center crop's geometry (the cache entry's) and the sample's flip draw, computed per
sample instead of cached: a mask costs no VAE pass, and one transform for image and mask keeps them
aligned by construction. The loss downsamples it to the latents (guide/masks.py).
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import UsageError
from .datacheck import IMAGE_SUFFIXES, SHOWN_PER_KIND, Problem
from .dataset import DatasetRow, Geometry, ImageTransform, open_image

if TYPE_CHECKING:
    from ..config.settings import TrainConfig

ALPHA = "alpha"  # a record's mask source: the image's alpha channel
MASK_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")  # 8-bit grayscale / RGB / with alpha
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
FACE_MASK_FOLDER = "face_masks"


def masks_on(config) -> bool:
    """Whether the run masks its loss: --masked_loss, or a flag that implies it (--alpha_mask, as in kohya;
    --face_masks)."""
    return config.masked_loss or config.alpha_mask or config.face_masks


def mask_values(image: Image.Image) -> np.ndarray:
    """(H, W) uint8: the R channel of a mask image (kohya reads the conditioning image as RGB, alpha dropped)."""
    return np.asarray(image.convert("RGB"))[..., 0]


def alpha_values(image: Image.Image) -> np.ndarray | None:
    """(H, W) uint8 alpha of an image with transparency, else None."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode not in ALPHA_MODES:
        return None
    return np.asarray(image.convert("RGBA"))[..., 3]


def find_mask_file(image: Path, root: Path, folder: Path) -> Path | None:
    """The mask of ``image`` (inside data folder ``root``) in ``folder``: same relative place and stem, else
    the same stem flat in ``folder``; any image suffix (.png first)."""
    try:
        relative = Path(image).resolve().relative_to(Path(root).resolve())
    except ValueError:
        relative = Path(Path(image).name)
    suffixes = sorted(IMAGE_SUFFIXES, key=lambda s: (s != ".png", s))
    for place in dict.fromkeys([folder / relative.parent, folder]):
        for suffix in suffixes:
            for candidate in (place / (relative.stem + suffix), place / (relative.stem + suffix.upper())):
                if candidate.is_file() and candidate.resolve() != Path(image).resolve():
                    return candidate
    return None


@dataclass
class LossMasks:
    """Each record's mask source (a mask file, ALPHA, or None for a full mask) and how a sample's mask is made:
    through ``transform`` (the dataset's; its resize filter) at the sample's Geometry."""

    sources: list
    records: list
    transform: ImageTransform

    def values(self, index: int) -> Image.Image | None:
        """The mask of record ``index`` as an 8-bit grayscale image at its image's size, or None (full)."""
        source = self.sources[index]
        if source is None:
            return None
        if source == ALPHA:
            return Image.fromarray(alpha_values(open_image(self.records[index][0])))
        with Image.open(source) as image:
            return Image.fromarray(mask_values(image))

    def view(self, index: int, geometry: Geometry) -> torch.Tensor:
        """(1, H, W) float32 in [0, 1]: sample ``index``'s mask resized, cropped and flipped as its image."""
        left, top, right, bottom = geometry.box
        mask = self.values(index)
        if mask is None:
            return torch.ones(1, bottom - top, right - left)
        warped = np.asarray(self.transform.warp(mask, geometry), dtype=np.float32)
        return torch.from_numpy(warped / 255.0)[None]

    def cached(self, index: int, entry, flipped: bool) -> torch.Tensor:
        """The mask of a latent-cache sample: the cache entry's center crop (latent_cache.CacheEntry), ``flipped``."""
        resized = self.transform.resized_size(entry.image_size, entry.target_size)
        return self.view(index, Geometry(resized, entry.crop_box, flipped))


def read_mask_sources(config: TrainConfig, records: list, names: list[str], sizes: list | None, root: Path | None,
                      folder: Path | None = None, stream=None) -> list:
    """Each record's mask source, every mask checked in one pass (each file once, however often kohya's
    repeats list its image): found, readable, an 8-bit grayscale/RGB/alpha image, its image's size, not all
    zero (nothing to learn; fine with --unmasked_weight > 0). Problems are printed together; the run then
    stops with one line (exit 2). ``folder``: where the mask files are (--conditioning_data_dir, or the
    face masks'); None: --alpha_mask."""
    problems: list[Problem] = []
    sources: dict[object, object] = {}
    found = []
    for index, (source, _) in enumerate(records):
        key = source if isinstance(source, (str, Path, DatasetRow)) else id(source)
        if key not in sources:
            size = sizes[index] if sizes is not None else None
            sources[key] = check_one(config, source, names[index], size, root, folder, problems)
        found.append(sources[key])
    if problems:
        stream = stream or sys.stdout
        for problem in problems[:SHOWN_PER_KIND]:
            print(f"  error: {problem}", file=stream)
        if len(problems) > SHOWN_PER_KIND:
            print(f"  ... and {len(problems) - SHOWN_PER_KIND} more mask problems", file=stream)
        more = f" (and {len(problems) - 1} more problems listed above)" if len(problems) > 1 else ""
        raise UsageError(f"{problems[0]}{more}")
    return found


def subset_mask_sources(config: TrainConfig, records, folder: Path | None) -> list:
    """Each record's mask source under --dataset_config: its subset's (alpha_mask, or conditioning_data_dir
    mirroring image_dir), else the run's (``folder``: --conditioning_data_dir; --alpha_mask), else None (a
    full mask: kohya trains a subset without masks unmasked). Checked subset by subset."""
    found, start = [], 0
    for subset, run in itertools.groupby(records.subsets):  # a subset's records are consecutive
        end = start + len(list(run))
        alpha = subset.alpha_mask or (config.alpha_mask and subset.conditioning_data_dir is None)
        where = subset.conditioning_data_dir or folder
        if alpha or where is not None:
            sizes = None if records.sizes is None else records.sizes[start:end]
            found += read_mask_sources(config, records.records[start:end], records.names[start:end], sizes,
                                       subset.image_dir, None if alpha else where)
        else:
            found += [None] * (end - start)
        start = end
    return found


NOTHING_TO_LEARN = "is all zero: nothing of the image would be learned; fix the mask, or give --unmasked_weight > 0"


def check_one(config, source, name: str, size, root: Path | None, folder: Path | None, problems: list):
    """The mask source of one image (see read_mask_sources): ALPHA (``folder`` None: --alpha_mask), its mask
    file, or None when it has a problem, which is appended to ``problems``."""
    def problem(where, kind, message):
        problems.append(Problem(str(where), kind, message, fatal=True))

    if folder is None:
        return check_alpha_mask(config, source, name, problem)
    return check_mask_file(config, source, name, size, root, folder, problem)


def check_alpha_mask(config, source, name: str, problem):
    """ALPHA when the image has an alpha channel that is not all zero; else None, its problem reported."""
    try:
        image = open_image(source)
        alpha = alpha_values(image)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        problem(name, "unreadable", f"cannot read image {name} ({err}); fix or remove it")
        return None
    if alpha is None:
        problem(name, "no-alpha", f"--alpha_mask: image {name} has no alpha channel ({image.mode}); save it as "
                                  "RGBA PNG with the mask in its alpha, or give masks with --conditioning_data_dir")
        return None
    if not config.unmasked_weight and not alpha.any():
        problem(name, "all-zero", f"--alpha_mask: the alpha of image {name} {NOTHING_TO_LEARN}")
    return ALPHA


def check_mask_file(config, source, name: str, size, root: Path | None, folder: Path, problem):
    """The image's mask file in ``folder`` when it is found, readable, 8-bit grayscale/RGB, the image's size
    and not all zero; else None, its problem reported."""
    path = find_mask_file(Path(source), root, folder)
    if path is None:
        problem(name, "no-mask", f"image {name} has no mask in {folder} (expected e.g. "
                                 f"{folder / Path(source).with_suffix('.png').name}, same stem); add it")
        return None
    try:
        with Image.open(path) as image:
            image.load()
            mode, mask_size = image.mode, image.size
            values = mask_values(image) if mode in MASK_MODES else None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        problem(path, "unreadable", f"cannot read mask {path} ({err}); fix or remove it")
        return None
    if values is None:
        problem(path, "bad-mode", f"mask {path} is a {mode} image, not 8-bit grayscale/RGB (with or without "
                                  "alpha); save it as a grayscale PNG (white = trained)")
        return None
    if size is None:
        size = open_image(source).size
    if tuple(mask_size) != tuple(size):
        problem(path, "bad-size", f"mask {path} is {mask_size[0]}x{mask_size[1]}, its image {name} is "
                                  f"{size[0]}x{size[1]}; save the mask at the image's size")
        return None
    if not config.unmasked_weight and not values.any():
        problem(path, "all-zero", f"mask {path} {NOTHING_TO_LEARN}")
    return path


def check_mask_flags(config) -> None:
    """The mask flags fit together (no data or model needed)."""
    on = masks_on(config)
    for flag, given in (("--normalize_masked_area_loss", config.normalize_masked_area_loss),
                        ("--unmasked_weight", config.unmasked_weight != 0.0),
                        ("--guide_within_mask", config.guide_within_mask)):
        if given and not on:
            raise UsageError(f"{flag} acts on the masked loss: add --masked_loss with a mask source "
                             "(--conditioning_data_dir, --alpha_mask or --face_masks), or drop it")
    if not 0.0 <= config.unmasked_weight <= 1.0:  # also rejects nan
        raise UsageError(f"--unmasked_weight is the loss weight outside the mask: give a value in [0, 1], "
                         f"got {config.unmasked_weight}")
    if config.face_mask_margin != type(config).__dataclass_fields__["face_mask_margin"].default and not config.face_masks:
        raise UsageError("--face_mask_margin widens the boxes of --face_masks: add --face_masks, or drop it")
    if not config.face_mask_margin >= 0:
        raise UsageError(f"--face_mask_margin must be >= 0 (a fraction of the face box), got {config.face_mask_margin}")
    if config.conditioning_data_dir is not None and not config.masked_loss:
        raise UsageError("--conditioning_data_dir holds the loss masks of --masked_loss: add --masked_loss")
    given = [flag for flag, on_ in (("--conditioning_data_dir", config.conditioning_data_dir is not None),
                                    ("--alpha_mask", config.alpha_mask), ("--face_masks", config.face_masks)) if on_]
    in_file = config.dataset_config is not None and any(
        s.alpha_mask or s.conditioning_data_dir is not None for s in config.dataset_subsets)
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} are two mask sources: pick one")
    if on and not given and not in_file:
        raise UsageError("--masked_loss needs masks: give --conditioning_data_dir DIR (a mask per image, same stem), "
                         "--alpha_mask (the images' alpha channel) or --face_masks (masks from detected faces)")
    if config.conditioning_data_dir is not None and not Path(config.conditioning_data_dir).is_dir():
        raise UsageError(f"--conditioning_data_dir {config.conditioning_data_dir} is not a folder")
    if (config.conditioning_data_dir is not None or config.face_masks) and config.dataset_name is not None:
        raise UsageError(f"{given[0]} pairs masks with image files, which --dataset_name rows are not: use "
                         "--alpha_mask, or give the images as --train_data_dir")
    if config.guide_within_mask and config.guide == "none":
        raise UsageError("--guide_within_mask restricts SAT's blur: give --guide sac or cac, or drop it")
