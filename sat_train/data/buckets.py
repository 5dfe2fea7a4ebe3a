"""Aspect-ratio buckets (``--enable_bucket``, kohya-ss/sd-scripts' scheme): the bucket table, each
image's bucket, and a batch sampler whose batches hold one bucket each.

The table (``make_buckets``, kohya's ``make_bucket_resolutions``): for every width from
``min_reso`` to ``max_reso`` in steps of ``steps``, the largest height that is a multiple of
``steps``, at most ``max_reso``, with width x height <= the area of ``--resolution`` (W*H), kept
when it is at least ``min_reso``; each such bucket also transposed; plus the largest square of at
most that area.

An image goes to the bucket whose aspect ratio is closest to its own (``assign_bucket``); with
``no_upscale`` (kohya's ``--bucket_no_upscale``) an image of at most that area gets a bucket of its
own size rounded down to the steps, a larger one the size it has once shrunk to the area. The data
set then resizes each image to cover its bucket and crops it (data.ImageTransform).

``BucketBatchSampler`` draws, per (seed, epoch) alone: the order within each bucket, the batches of
``batch_size`` it is cut into (a bucket's last batch may be smaller, as in kohya), and the order of
all batches. Resume and several processes therefore see the same batches (see the class).
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from ..errors import UsageError
from ..seeding import derived_generator

# third key of derived_generator (seed, epoch, BUCKET_STREAM, k): far above any sample index, so the
# sampler's draws never share a stream with the data set's (seed, epoch, index[, stream]) ones;
# k = 0 orders the batches, k = 1 + b shuffles bucket b
BUCKET_STREAM = 0x62756B74


def make_buckets(resolution: tuple[int, int], min_reso: int, max_reso: int, steps: int) -> list[tuple[int, int]]:
    """(width, height) buckets of at most resolution[0] * resolution[1] pixels, sorted (see the module doc)."""
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area)) // steps * steps
    buckets = {(side, side)}
    for width in range(min_reso, max_reso + 1, steps):
        height = min(max_reso, area // width // steps * steps)
        if height >= min_reso:
            buckets |= {(width, height), (height, width)}
    return sorted(buckets)


def assign_bucket(size: tuple[int, int], buckets: list[tuple[int, int]], no_upscale: bool = False,
                  area: int | None = None, steps: int = 64) -> tuple[int, int]:
    """The bucket of an image of ``size`` (width, height). Upscaling allowed: its own size when that is
    a bucket, else the bucket of the closest aspect ratio (the first of the sorted table on a tie).
    ``no_upscale``: kohya's own-size bucket (needs ``area``, the --resolution area, and ``steps``)."""
    if no_upscale:
        return own_size_bucket(size, area, steps)
    if tuple(size) in buckets:
        return tuple(size)
    ratio = size[0] / size[1]
    return min(buckets, key=lambda bucket: abs(bucket[0] / bucket[1] - ratio))  # min keeps the first on a tie


def own_size_bucket(size: tuple[int, int], area: int, steps: int) -> tuple[int, int]:
    """kohya's ``--bucket_no_upscale`` bucket: the image's size (shrunk to ``area`` keeping its aspect
    ratio when larger) rounded down to multiples of ``steps``; a side never below ``steps``."""
    width, height = size
    if width * height > area:
        ratio = width / height
        width, height = shrunk_to_area(ratio, area, steps)
    return max(steps, width - width % steps), max(steps, height - height % steps)


def shrunk_to_area(ratio: float, area: int, steps: int) -> tuple[int, int]:
    """kohya's size of an image of aspect ``ratio`` shrunk to ``area``: the width or the height rounded to
    ``steps`` (whichever keeps the aspect ratio closer), the other side following the ratio."""
    def round_to_steps(x: float) -> int:
        x = int(x + 0.5)
        return x - x % steps

    width = math.sqrt(area * ratio)
    height = area / width
    width_rounded = round_to_steps(width)
    height_for_width = max(1, round_to_steps(width_rounded / ratio))
    height_rounded = round_to_steps(height)
    width_for_height = round_to_steps(height_rounded * ratio)
    error_width = abs(width_rounded / height_for_width - ratio)
    error_height = abs(width_for_height / max(1, height_rounded) - ratio)
    if error_width < error_height:
        return width_rounded, int(width_rounded / ratio + 0.5)
    return int(height_rounded * ratio + 0.5), height_rounded


def assign_buckets(config, sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The bucket of every sample (``sizes``: their images' (width, height)) under ``config``'s flags."""
    resolution = config.resolution_wh
    table = config.bucket_resolutions
    area = resolution[0] * resolution[1]
    return [assign_bucket(size, table, config.bucket_no_upscale, area, config.bucket_reso_steps) for size in sizes]


def bucket_table_text(buckets: list[tuple[int, int]]) -> str:
    """A heading, then one line per bucket in use: ``bucket WxH: N images`` (repeats counted), widest last."""
    counts = Counter(buckets)
    by_ratio = sorted(counts.items(), key=lambda item: item[0][0] / item[0][1])
    lines = [f"aspect-ratio buckets ({len(counts)} in use, {len(buckets)} samples an epoch with repeats):"]
    return "\n".join(lines + [f"  bucket {w}x{h}: {n} images" for (w, h), n in by_ratio])


class EpochSetting:
    """The epoch a BucketBatchSampler draws for. accelerate's DataLoaderShard.set_epoch reaches a batch
    sampler it wrapped (BatchSamplerShard, under several processes) only through
    ``batch_sampler.batch_sampler.sampler.set_epoch``, so the sampler keeps its epoch here, as ``.sampler``."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class BucketBatchSampler:
    """Batches of sample indices, each from one bucket, per (seed, epoch) alone.

    Each epoch: the indices of every bucket shuffled, cut into batches of ``batch_size`` (the last of
    a bucket kept even when smaller), all batches shuffled. Every index comes once an epoch.

    It has no ``batch_size`` attribute on purpose: accelerate's BatchSamplerShard then takes each
    batch as it is (dynamic length) and deals whole batches round-robin to the processes, padding the
    epoch with its first batches so every process gets ``ceil(len / processes)`` of them
    (even_batches). ``set_epoch`` reaches it directly or through ``.sampler`` (EpochSetting).
    """

    def __init__(self, buckets: list[tuple[int, int]], batch_size: int, seed: int):
        self.buckets, self.batch_size_per_bucket, self.seed = list(buckets), batch_size, seed
        self.sampler = EpochSetting()
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            by_bucket.setdefault(bucket, []).append(index)
        self.members = [by_bucket[bucket] for bucket in sorted(by_bucket)]  # a fixed order to key the draws by

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return sum(math.ceil(len(members) / self.batch_size_per_bucket) for members in self.members)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        size = self.batch_size_per_bucket
        batches = []
        for key, members in enumerate(self.members):
            order = torch.randperm(len(members), generator=derived_generator(self.seed, epoch, BUCKET_STREAM, 1 + key))
            shuffled = [members[i] for i in order.tolist()]
            batches += [shuffled[start:start + size] for start in range(0, len(shuffled), size)]
        order = torch.randperm(len(batches), generator=derived_generator(self.seed, epoch, BUCKET_STREAM, 0))
        return [batches[i] for i in order.tolist()]

    def __iter__(self):
        return iter(self.epoch_batches(self.epoch))


def check_resolution_flags(config) -> None:
    """--resolution (an int or W,H) and kohya's bucket flags."""
    width, height = config.resolution_wh  # raises on a bad --resolution
    if not config.enable_bucket:
        return
    steps, low, high = config.bucket_reso_steps, config.min_bucket_reso, config.max_bucket_reso
    if steps < 8 or steps % 8:
        raise UsageError(f"--bucket_reso_steps must be a multiple of 8 (the VAE's downsampling), >= 8, got {steps}"
                         "; kohya's default is 64")
    for name, value in (("min_bucket_reso", low), ("max_bucket_reso", high)):
        if value < steps or value % steps:
            raise UsageError(f"--{name} {value} is not a multiple of --bucket_reso_steps {steps}: give e.g. "
                             f"{max(steps, value - value % steps)}")
    if low > high:
        raise UsageError(f"--min_bucket_reso {low} is larger than --max_bucket_reso {high}: swap them")
    if not (low <= width <= high and low <= height <= high):
        raise UsageError(f"--resolution {config.resolution} lies outside the bucket sides [--min_bucket_reso {low}, "
                         f"--max_bucket_reso {high}]: widen them or change --resolution")
