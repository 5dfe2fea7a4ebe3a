"""Training data: an image folder with metadata.jsonl, a kohya-style folder (``N_name/`` subfolders,
same-stem caption files; see datacheck.scan_kohya_folder), or a Hugging Face dataset → batches of
``pixel_values`` (B, 3, R, R) in [-1, 1] (with a latent cache, latent_cache.py: ``latent_params``
instead) and ``input_ids`` (B, model_max_length).

The image folder reader is our own (the ``datasets`` package is optional): each line of
``metadata.jsonl`` is ``{"file_name": "a.jpg", "text": "a caption"}``. Every problem the user
can fix raises UsageError naming the file and what to do.

With ``--dataset_name`` (as in diffusers' train_text_to_image_lora.py) the "train" split of
``datasets.load_dataset`` is read: captions up front (checked, before any model loads), images
lazily per sample (see DatasetRow). A caption column holding lists of captions gives each sample
one of them, drawn anew each epoch as diffusers does, from (seed, epoch, index) alone.

Kohya's caption flags (--shuffle_caption, --keep_tokens, --caption_dropout_rate,
--caption_tag_dropout_rate; CaptionAugment) act on every caption source, drawn the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .buckets import assign_buckets
from .config import TrainConfig, UsageError
from .datacheck import SmallImageRule, scan_image_folder, to_rgb
from .sdxl import SIZE_KEYS, size_conditioning
from .seeding import derived_generator

CAPTION_STREAM = 1  # extra key of derived_generator: the caption pick draws apart from the crop/flip draws
CAPTION_AUGMENT_STREAM = 2  # ... and kohya's caption dropout / tag shuffle / tag dropout apart from both
# batch key of the cached VAE latent distributions (latent_cache.py), carried instead of pixel_values
LATENT_PARAMS = "latent_params"

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
        target = size or self.size
        image = to_rgb(image)  # grayscale, 16-bit, RGBA, CMYK, palette → 8-bit RGB
        image = image.resize(self.resized_size(image.size, target), self.resample)
        box = self.crop_box(image.size, generator, target)
        width = image.width
        image = image.crop(box)
        if self.draws_flip(generator):
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            box = mirrored_box(box, width)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return pixels.float().div(127.5).sub(1.0), box

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

    def __init__(self, records: list[tuple[object, str | tuple[str, ...]]], transform: ImageTransform, tokenizer,
                 describe, seed: int = 0, augment: CaptionAugment = CaptionAugment(), tokenizer_2=None):
        self.records, self.transform, self.tokenizer, self.describe = records, transform, tokenizer, describe
        self.tokenizer_2 = tokenizer_2  # SDXL's second tokenizer: items then carry input_ids_2 and sdxl.SIZE_KEYS
        self.seed, self.epoch, self.augment = seed, 0, augment
        self.cac_word_ids: list[tuple[int, ...]] | None = None  # set by build_dataset for --guide cac
        self.buckets: list[tuple[int, int]] | None = None  # each sample's (W, H) bucket; set for --enable_bucket
        self.latent_cache = None  # set by latent_cache.cache_latents: items then carry latent_params, no pixels

    def set_epoch(self, epoch: int) -> None:  # accelerate's DataLoaderShard.set_epoch calls this
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.image_item(index)
        caption = self.caption(index)
        # the caption as the text encoder sees it; CAC's words are found in it below
        item["input_ids"] = tokenize(self.tokenizer, [caption])[0]
        if self.tokenizer_2 is not None:
            item["input_ids_2"] = tokenize(self.tokenizer_2, [caption])[0]
        if self.cac_word_ids is not None:  # --guide cac: where the chosen words sit in the caption
            item["cac_tokens"] = torch.tensor(
                word_token_positions(self.tokenizer, item["input_ids"], self.cac_word_ids), dtype=torch.long)
        return item

    def image_item(self, index: int) -> dict[str, torch.Tensor]:
        """{"pixel_values": the transformed image}, or with a latent cache {LATENT_PARAMS: the cached
        VAE distribution of the flip this epoch draws}: the same flip draw as the uncached center crop."""
        generator = derived_generator(self.seed, self.epoch, index)
        if self.latent_cache is not None:
            flipped = self.transform.draws_flip(generator)
            item = {LATENT_PARAMS: self.latent_cache.params(index, flipped=flipped)}
            if self.tokenizer_2 is not None:
                item.update(self.latent_cache.size_conditioning(index, flipped))
            return item
        pixels, conditioning = self.transformed(index, generator)
        return {"pixel_values": pixels, **(conditioning if self.tokenizer_2 is not None else {})}

    def pixels(self, index: int, generator: torch.Generator | None = None, transform=None) -> torch.Tensor:
        """Sample ``index``'s image through ``transform`` (default: the dataset's) at its target size,
        drawing from ``generator``."""
        return self.transformed(index, generator, transform)[0]

    def transformed(self, index: int, generator: torch.Generator | None = None, transform=None):
        """(pixels, SDXL's size conditioning of them: sdxl.size_conditioning) of sample ``index``."""
        try:
            image = open_image(self.records[index][0])
            pixels, box = (transform or self.transform).with_crop_box(image, generator, self.target_size(index))
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise UsageError(f"cannot read image {self.describe(index)}: {err}; fix or remove it") from err
        return pixels, size_conditioning(image.size, box)

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
        if self.augment.active:
            caption = self.augment(caption, derived_generator(self.seed, self.epoch, index, CAPTION_AUGMENT_STREAM))
        return caption


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length",
                     truncation=True, return_tensors="pt").input_ids


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


def read_records(config: TrainConfig, data_dir: Path | None = None, quiet: bool = False
                 ) -> tuple[list[tuple[object, str | tuple[str, ...]]], list[str]]:
    """(image, caption) records and a name per record for messages; runs before any model loads,
    so data problems show in seconds. ``data_dir`` overrides --train_data_dir (the demo's photos).
    ``quiet``: the data check prints nothing (every process but the main one); errors still raise."""
    if config.dataset_name is not None and data_dir is None:
        records, names = read_hf_dataset(config)
    else:
        # the data check (datacheck.py): every problem listed in one pass, fatal ones exit 2 here
        (width, height), size_flag = config.small_image_size
        no_upscale = config.enable_bucket and config.bucket_no_upscale
        small = SmallImageRule(width, height, size_flag,
                               "--bucket_no_upscale" if no_upscale else "--skip_small_images")
        report = scan_image_folder(Path(data_dir or config.train_data_dir), config.image_column,
                                   config.caption_column, resolution=small,
                                   skip_small_images=config.skip_small_images or no_upscale, strict=config.strict_data,
                                   quiet=quiet, caption_suffix=config.caption_suffix)
        records, names = report.records, report.names
    if config.max_train_samples is not None:
        records, names = records[: config.max_train_samples], names[: config.max_train_samples]
    return records, names


def build_dataset(config: TrainConfig, records, names, tokenizer, seed: int = 0, tokenizer_2=None) -> CaptionedImages:
    """The run's dataset; ``tokenizer_2`` (SDXL's second tokenizer) adds input_ids_2 and the size conditioning."""
    # a latent cache holds each image's center crop (see --random_crop)
    transform = ImageTransform(config.resolution_wh, config.center_crop or config.caches_latents, config.random_flip,
                               config.image_interpolation_mode)
    augment = CaptionAugment(shuffle=config.shuffle_caption, keep_tokens=config.keep_tokens,
                             dropout_rate=config.caption_dropout_rate, tag_dropout_rate=config.caption_tag_dropout_rate)
    # names.__getitem__, not a lambda: spawn/forkserver data loader workers (the Linux default from
    # Python 3.14) receive the dataset by pickle
    dataset = CaptionedImages(records, transform, tokenizer, describe=names.__getitem__, seed=seed, augment=augment,
                              tokenizer_2=tokenizer_2)
    if config.guide == "cac":
        dataset.cac_word_ids = word_token_ids(tokenizer, config.cac_word_list)
        if tokenizer_2 is not None:
            check_word_positions_agree(tokenizer, tokenizer_2, config.cac_word_list, records, names)
    if config.enable_bucket:
        dataset.buckets = assign_buckets(config, image_sizes(records, names.__getitem__))
    return dataset


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
    images = "pixel_values" if "pixel_values" in examples[0] else LATENT_PARAMS  # a latent cache: no pixels
    return {
        images: torch.stack([e[images] for e in examples]).contiguous(),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        **({"cac_tokens": pad_token_positions([e["cac_tokens"] for e in examples])}
           if "cac_tokens" in examples[0] else {}),
        **{key: torch.stack([e[key] for e in examples]) for key in SDXL_BATCH_KEYS if key in examples[0]},
    }


# what an SDXL batch carries besides SD v1.5's (sdxl.py): the second tokenizer's ids and the sizes
SDXL_BATCH_KEYS = ("input_ids_2", *SIZE_KEYS)


# ----------------------------------------------------------------------------- CAC token picks


def word_token_ids(tokenizer, words: list[str]) -> list[tuple[int, ...]]:
    """Each word's token ids as the model's tokenizer writes it inside a caption (one or more BPE tokens)."""
    found = []
    for word in words:
        ids = tuple(tokenizer(word, add_special_tokens=False).input_ids)
        if ids and ids not in found:
            found.append(ids)
    return found


def word_token_positions(tokenizer, input_ids, word_ids: list[tuple[int, ...]]) -> list[int]:
    """Sorted positions in ``input_ids`` of every token of every whole-word occurrence of ``word_ids``.

    A match must start a word: CLIP's BPE marks word ends with ``</w>``, so the token before the
    match must end a word (or be a special token); "hand" then does not match inside "thand".
    """
    ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    positions: set[int] = set()
    for word in word_ids:
        n = len(word)
        marks_word_ends = tokenizer.convert_ids_to_tokens([word[-1]])[0].endswith("</w>")
        for p in range(len(ids) - n + 1):
            if tuple(ids[p:p + n]) != word:
                continue
            if marks_word_ends and p > 0 and ids[p - 1] not in special and not tokens[p - 1].endswith("</w>"):
                continue  # the match continues an earlier word
            positions.update(range(p, p + n))
    return sorted(positions)


def check_word_positions_agree(tokenizer, tokenizer_2, words: list[str], records, names) -> None:
    """SDXL's CAC reads positions from the first tokenizer's ids; the UNet's context at a position is
    both encoders' states there, so the second tokenizer must put the chosen words at the same
    positions (SDXL's two CLIP tokenizers share the vocabulary and differ only in padding). Checked
    for every caption before training: a pair that disagrees would blur where other words attend."""
    word_ids, word_ids_2 = word_token_ids(tokenizer, words), word_token_ids(tokenizer_2, words)
    for index, (_, captions) in enumerate(records):
        for caption in (captions,) if isinstance(captions, str) else captions:
            first = word_token_positions(tokenizer, tokenize(tokenizer, [caption])[0], word_ids)
            second = word_token_positions(tokenizer_2, tokenize(tokenizer_2, [caption])[0], word_ids_2)
            if first != second:
                raise UsageError(f"--guide cac: the caption of {names[index]} puts --cac_words at positions {first} "
                                 f"for tokenizer/ but {second} for tokenizer_2/: SDXL's two tokenizers must split "
                                 "captions alike; use the model's own tokenizers, or --guide sac")


def pad_token_positions(rows: list[torch.Tensor]) -> torch.Tensor:
    """(B, S) long, each row's positions then -1 padding (S >= 1, so a batch without words is all -1)."""
    width = max([1] + [len(r) for r in rows])
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
