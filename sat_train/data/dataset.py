"""The run's records (records.py) → batches of ``pixel_values`` (B, 3, R, R) in [-1, 1] (with a
latent cache, latent_cache.py: ``latent_params`` instead), the family's token ids (``input_ids``
(B, model_max_length), SDXL's ``input_ids_2``) and its image conditioning (SDXL's sizes).

Images open lazily per sample (a --dataset_name row through DatasetRow). A record holding several
captions gives each sample one of them, drawn anew each epoch as diffusers does, from (seed, epoch,
index) alone.

Kohya's caption flags (--shuffle_caption, --keep_tokens, --caption_dropout_rate,
--caption_tag_dropout_rate; CaptionAugment) act on every caption source, drawn the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import UsageError
from ..models.words import pad_token_positions, word_token_ids, word_token_positions
from ..seeding import derived_generator
from .buckets import assign_buckets
from .datacheck import IMAGE_SUFFIXES, to_rgb

if TYPE_CHECKING:
    from ..config.settings import TrainConfig

CAPTION_STREAM = 1  # extra key of derived_generator: the caption pick draws apart from the crop/flip draws
CAPTION_AUGMENT_STREAM = 2  # ... and kohya's caption dropout / tag shuffle / tag dropout apart from both
# batch key of the cached VAE latent distributions (latent_cache.py), carried instead of pixel_values
LATENT_PARAMS = "latent_params"
# batch key of a sample's loss mask (1, H, W) in [0, 1] at the image's trained size (--masked_loss; masks.py)
LOSS_MASK = "loss_mask"
IS_REG = "is_reg"  # batch key: (B,) bool, the regularization samples (data/regularization.py)

# --image_interpolation_mode → PIL filter, as torchvision maps InterpolationMode for PIL images
PIL_FILTERS = {"nearest": Image.NEAREST, "nearest_exact": Image.NEAREST, "bilinear": Image.BILINEAR,
               "bicubic": Image.BICUBIC, "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


class ImageTransform:
    """Resize to cover a target size (``interpolation``: a --image_interpolation_mode name), crop it,
    maybe flip, scale to [-1, 1].

    The target is ``resolution`` (an int: a square, as the diffusers example's torchvision pipeline
    does it, without torchvision; or (width, height)), or the ``size`` passed per call (the sample's
    aspect-ratio bucket). Random crops and flips draw from the ``generator`` passed in, never from the
    global one; ``center_crop`` crops the middle.
    """

    def __init__(self, resolution: int | tuple[int, int], center_crop: bool, random_flip: bool,
                 interpolation: str = "lanczos"):
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        self.interpolation, self.resample = interpolation, PIL_FILTERS[interpolation]

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None,
                 size: tuple[int, int] | None = None) -> torch.Tensor:
        return self.with_crop_box(image, generator, size)[0]

    def with_crop_box(self, image: Image.Image, generator: torch.Generator | None = None,
                      size: tuple[int, int] | None = None) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """The transformed image and its crop box in the resized image (SDXL's crop conditioning), mirrored
        when the crop is flipped: the box of the same pixels in the flipped image, as diffusers' SDXL
        example (which flips, then crops) and sd-scripts report a flipped sample's crop."""
        return self.with_geometry(image, generator, size)[:2]

    def with_geometry(self, image: Image.Image, generator: torch.Generator | None = None,
                      size: tuple[int, int] | None = None):
        """``with_crop_box`` and the sample's ``Geometry`` (what ``warp`` repeats on its mask)."""
        geometry = self.geometry(image.size, generator, size)
        image = self.warp(to_rgb(image), geometry)  # to_rgb: grayscale, 16-bit, RGBA, CMYK, palette → 8-bit RGB
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        box = mirrored_box(geometry.box, geometry.resized[0]) if geometry.flipped else geometry.box
        return pixels.float().div(127.5).sub(1.0), box, geometry

    def geometry(self, image_size: tuple[int, int], generator: torch.Generator | None = None,
                 size: tuple[int, int] | None = None) -> Geometry:
        """Where an image of ``image_size`` goes: its resize, crop box (drawn first) and flip (drawn next)."""
        target = size or self.size
        resized = self.resized_size(image_size, target)
        box = self.crop_box(resized, generator, target)
        return Geometry(resized, box, self.draws_flip(generator))

    def warp(self, image: Image.Image, geometry: Geometry) -> Image.Image:
        """``image`` resized, cropped and flipped as ``geometry`` says (an image's loss mask goes the same way)."""
        image = image.resize(geometry.resized, self.resample).crop(geometry.box)
        return image.transpose(Image.FLIP_LEFT_RIGHT) if geometry.flipped else image

    def resized_size(self, size: tuple[int, int], target: tuple[int, int] | None = None) -> tuple[int, int]:
        """(W, H) of an image of ``size`` once resized to cover ``target`` (default: the resolution's
        size; a square target: the short side resized to it)."""
        (w, h), (target_w, target_h) = size, target or self.size
        scale = max(target_w / w, target_h / h)  # the smallest resize that covers the target
        return max(target_w, round(w * scale)), max(target_h, round(h * scale))

    def crop_box(self, size: tuple[int, int], generator: torch.Generator | None = None,
                 target: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the ``target``-sized crop (default: the resolution's) of a resized
        image of ``size``: centered, or drawn from ``generator`` (two draws) without --center_crop."""
        (w, h), (target_w, target_h) = size, target or self.size
        if self.center_crop:
            top, left = (h - target_h) // 2, (w - target_w) // 2
        else:
            top = int(torch.randint(0, h - target_h + 1, (), generator=generator).item())
            left = int(torch.randint(0, w - target_w + 1, (), generator=generator).item())
        return left, top, left + target_w, top + target_h

    def draws_flip(self, generator: torch.Generator | None = None) -> bool:
        """--random_flip's pick (one draw from ``generator``, after the crop's); False without the flag.
        The latent cache (latent_cache.py) picks a sample's cached flip with the same draw."""
        return self.random_flip and torch.rand((), generator=generator).item() < 0.5


class Geometry(NamedTuple):
    """A sample's resize (W, H), crop box (in the resized image) and flip: its image's and its mask's."""

    resized: tuple[int, int]
    box: tuple[int, int, int, int]
    flipped: bool


def mirrored_box(box: tuple[int, int, int, int], width: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) ``box`` of an image ``width`` wide, in that image flipped left-right."""
    left, top, right, bottom = box
    return width - right, top, width - left, bottom


@dataclass(frozen=True)
class CaptionAugment:
    """Kohya's caption flags, applied to a sample's caption with draws from its own generator.

    Order as in kohya-ss/sd-scripts: the whole caption is dropped with ``dropout_rate``; otherwise,
    when shuffling or dropping tags, the caption is split at commas, the first ``keep_tokens`` tags
    stay in front, the rest are shuffled (``shuffle``) and each left out with ``tag_dropout_rate``,
    and the tags are joined with ", ". The generator always makes the same three draws (one uniform,
    a permutation and one uniform per movable tag), so each result is a function of the caption and
    the generator's seed alone.
    """

    shuffle: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0

    @property
    def active(self) -> bool:
        return self.shuffle or self.dropout_rate > 0 or self.tag_dropout_rate > 0

    def __call__(self, caption: str, generator: torch.Generator) -> str:
        drop_caption = torch.rand((), generator=generator).item() < self.dropout_rate
        tags = [tag.strip() for tag in caption.split(",")]
        fixed, movable = tags[: self.keep_tokens], tags[self.keep_tokens:]
        order = torch.randperm(len(movable), generator=generator).tolist()
        keep = (torch.rand(len(movable), generator=generator) >= self.tag_dropout_rate).tolist()
        if drop_caption:
            return ""
        if not (self.shuffle or self.tag_dropout_rate > 0):
            return caption
        if self.shuffle:
            movable = [movable[i] for i in order]
        return ", ".join(fixed + [tag for tag, kept in zip(movable, keep) if kept])


class CaptionedImages(Dataset):
    """(image, caption) records → {"pixel_values", "input_ids"}; images are opened lazily.

    The random crop/flip of sample ``index``, its pick when the record holds several captions, and
    kohya's caption shuffle/dropout are functions of (seed, epoch, index) alone, so they do not
    depend on prefetching, worker processes, or where a resumed run restarts.
    """

    def __init__(self, records: list[tuple[object, str | tuple[str, ...]]], transform: ImageTransform, tokenizers: list,
                 family, describe, seed: int = 0, augment: CaptionAugment = CaptionAugment()):
        self.records, self.transform, self.describe = records, transform, describe
        # the model's tokenizers and family (models/family.py): what an item carries besides the image
        self.tokenizers, self.family = tokenizers, family
        self.seed, self.epoch, self.augment = seed, 0, augment
        self.cac_word_ids: list[tuple[int, ...]] | None = None  # set by build_dataset for --guide cac
        self.buckets: list[tuple[int, int]] | None = None  # each sample's (W, H) bucket; set for --enable_bucket
        self.sizes: list[tuple[int, int]] | None = None  # each record's image (W, H), when the data check read it
        self.latent_cache = None  # set by latent_cache.cache_latents: items then carry latent_params, no pixels
        self.record_augments: list[CaptionAugment] | None = None  # --dataset_config: each record's subset's flags
        self.loss_masks = None  # --masked_loss: masks.LossMasks; items then carry LOSS_MASK
        self.is_reg: list[bool] | None = None  # each record's regularization flag; set with regularization images

    def set_epoch(self, epoch: int) -> None:  # accelerate's DataLoaderShard.set_epoch calls this
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.image_item(index)
        # the caption as the text encoders see it; CAC's words are found in the first one's ids below
        item.update(self.family.caption_inputs(self.tokenizers, self.caption(index)))
        if self.cac_word_ids is not None:  # --guide cac: where the chosen words sit in the caption
            item["cac_tokens"] = torch.tensor(
                word_token_positions(self.tokenizers[0], item["input_ids"], self.cac_word_ids), dtype=torch.long)
        if self.is_reg is not None:
            item[IS_REG] = torch.tensor(self.is_reg[index])
        return item

    def image_item(self, index: int) -> dict[str, torch.Tensor]:
        """{"pixel_values": the transformed image}, or with a latent cache {LATENT_PARAMS: the cached
        VAE distribution of the flip this epoch draws}: the same flip draw as the uncached center crop;
        and the family's conditioning on the image's sizes (SDXL's)."""
        generator = derived_generator(self.seed, self.epoch, index)
        if self.latent_cache is not None:
            flipped = self.transform.draws_flip(generator)
            item = {LATENT_PARAMS: self.latent_cache.params(index, flipped=flipped),
                    **self.latent_cache.image_conditioning(index, flipped)}
            if self.loss_masks is not None:  # the cached center crop's geometry, this epoch's flip
                item[LOSS_MASK] = self.loss_masks.cached(index, self.latent_cache.entries[index], flipped)
            return item
        pixels, conditioning, geometry = self.transformed(index, generator, with_geometry=True)
        item = {"pixel_values": pixels, **conditioning}
        if self.loss_masks is not None:
            item[LOSS_MASK] = self.loss_masks.view(index, geometry)
        return item

    def pixels(self, index: int, generator: torch.Generator | None = None, transform=None) -> torch.Tensor:
        """Sample ``index``'s image through ``transform`` (default: the dataset's) at its target size,
        drawing from ``generator``."""
        return self.transformed(index, generator, transform)[0]

    def transformed(self, index: int, generator: torch.Generator | None = None, transform=None,
                    with_geometry: bool = False):
        """(pixels, the family's conditioning on their sizes: SD15.image_conditioning) of sample ``index``,
        and its Geometry when ``with_geometry``."""
        try:
            image = open_image(self.records[index][0])
            pixels, box, geometry = (transform or self.transform).with_geometry(image, generator,
                                                                                self.target_size(index))
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise UsageError(f"cannot read image {self.describe(index)}: {err}; fix or remove it") from err
        conditioning = self.family.image_conditioning(image.size, box)
        return (pixels, conditioning, geometry) if with_geometry else (pixels, conditioning)

    def record_sizes(self) -> list[tuple[int, int]]:
        """Every record's image (W, H): ``sizes`` when the data check gave them, else read (``image_sizes``)."""
        return self.sizes if self.sizes is not None else image_sizes(self.records, self.describe)

    def target_size(self, index: int) -> tuple[int, int]:
        """(W, H) of sample ``index`` as trained: its bucket with --enable_bucket, else --resolution's."""
        return self.buckets[index] if self.buckets is not None else self.transform.size

    def caption(self, index: int) -> str:
        """Sample ``index``'s caption this epoch: one of several (a --dataset_name list column), then
        kohya's caption flags; both drawn from (seed, epoch, index)."""
        caption = self.records[index][1]
        if not isinstance(caption, str):
            pick = derived_generator(self.seed, self.epoch, index, CAPTION_STREAM)
            caption = caption[int(torch.randint(0, len(caption), (), generator=pick).item())]
        augment = self.augment if self.record_augments is None else self.record_augments[index]
        if augment.active:
            caption = augment(caption, derived_generator(self.seed, self.epoch, index, CAPTION_AUGMENT_STREAM))
        return caption


@dataclass(frozen=True, eq=False)
class DatasetRow:
    """The image of one row of a ``datasets.Dataset``, decoded only when its sample is drawn.

    Decoding every image up front (iterating the dataset) would hold the whole dataset in memory,
    and copy it into each data loader worker; the arrow table behind ``images`` is memory-mapped.
    """

    images: object  # a datasets.Dataset holding only the image column
    column: str
    row: int

    def open(self) -> Image.Image:
        image = self.images[self.row][self.column]
        if image is None:
            raise ValueError("the row has no image")
        return image


def open_image(source) -> Image.Image:
    if isinstance(source, DatasetRow):
        return source.open()
    return Image.open(source) if isinstance(source, (str, Path)) else source


def build_dataset(config: TrainConfig, records, names, tokenizers: list, family, seed: int = 0,
                  sizes: list[tuple[int, int]] | None = None, subsets: list | None = None) -> CaptionedImages:
    """The run's dataset, for a model of ``family`` with ``tokenizers`` (Components.tokenizers). ``sizes``:
    each record's image (W, H) when known (records.Records.sizes, from the data check): the buckets and the
    latent cache then use them instead of opening every image (``image_sizes``). ``subsets``: each record's
    --dataset_config subset, whose caption flags replace the run's where it sets them."""
    # a latent cache holds each image's center crop (see --random_crop)
    transform = ImageTransform(config.resolution_wh, config.center_crop or config.caches_latents, config.random_flip,
                               config.image_interpolation_mode)
    augment = CaptionAugment(shuffle=config.shuffle_caption, keep_tokens=config.keep_tokens,
                             dropout_rate=config.caption_dropout_rate, tag_dropout_rate=config.caption_tag_dropout_rate)
    # names.__getitem__, not a lambda: spawn/forkserver data loader workers (the Linux default from
    # Python 3.14) receive the dataset by pickle
    dataset = CaptionedImages(records, transform, tokenizers, family, describe=names.__getitem__, seed=seed,
                              augment=augment)
    if subsets is not None:
        dataset.record_augments = [subset_augment(subset, augment) for subset in subsets]
    if config.guide == "cac":
        dataset.cac_word_ids = word_token_ids(tokenizers[0], config.cac_word_list)
        family.check_caption_words(tokenizers, config.cac_word_list, records, names)
    if sizes is not None:
        if len(sizes) != len(records):
            raise ValueError(f"{len(sizes)} image sizes for {len(records)} records")
        dataset.sizes = list(sizes)
    if config.enable_bucket:
        dataset.buckets = assign_buckets(config, dataset.record_sizes())
    return dataset


def subset_augment(subset, run: CaptionAugment) -> CaptionAugment:
    """The caption flags of a subset (subsets.Subset): its own values, the run's where it sets none."""
    def pick(own, default):
        return default if own is None else own

    return CaptionAugment(shuffle=pick(subset.shuffle_caption, run.shuffle), keep_tokens=pick(subset.keep_tokens,
                          run.keep_tokens), dropout_rate=pick(subset.caption_dropout_rate, run.dropout_rate),
                          tag_dropout_rate=pick(subset.caption_tag_dropout_rate, run.tag_dropout_rate))


def image_sizes(records, describe) -> list[tuple[int, int]]:
    """(width, height) of every record's image: file headers only (PIL opens lazily), each file once
    however often kohya's repeats list it; a --dataset_name row is decoded (its size is not stored apart)."""
    sizes: dict[object, tuple[int, int]] = {}
    found = []
    for index, (source, _) in enumerate(records):
        key = source if isinstance(source, (str, Path, DatasetRow)) else id(source)
        if key not in sizes:
            try:
                image = open_image(source)
            except (OSError, UnidentifiedImageError, ValueError) as err:
                raise UsageError(f"cannot read image {describe(index)}: {err}; fix or remove it") from err
            sizes[key] = image.size
            if isinstance(source, (str, Path)):
                image.close()
        found.append(sizes[key])
    return found


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Samples → a batch: every tensor stacked, CAC's token positions padded (their counts differ)."""
    batch = {key: torch.stack([e[key] for e in examples]) for key in examples[0] if key != "cac_tokens"}
    if "cac_tokens" in examples[0]:
        batch["cac_tokens"] = pad_token_positions([e["cac_tokens"] for e in examples])
    return batch


def check_caption_flags(config) -> None:
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0.0 <= getattr(config, name) <= 1.0:  # also rejects nan
            raise UsageError(f"--{name} is a probability: give a value in [0, 1], got {getattr(config, name)}")
    if config.keep_tokens < 0:
        raise UsageError(f"--keep_tokens must be >= 0 (tags kept in front), got {config.keep_tokens}")
    if config.keep_tokens and not (config.shuffle_caption or config.caption_tag_dropout_rate):
        raise UsageError("--keep_tokens keeps tags in front of shuffled or dropped ones: add --shuffle_caption "
                         "or --caption_tag_dropout_rate, or drop --keep_tokens")
    suffix = config.caption_suffix
    if suffix in (".", "") or any(c in suffix for c in "/\\") or suffix.lower() in IMAGE_SUFFIXES:
        raise UsageError(f"--caption_extension {config.caption_extension!r} cannot name caption files: give a "
                         "suffix such as .txt or .caption")
