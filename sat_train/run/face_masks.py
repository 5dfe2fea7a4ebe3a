"""The run's loss-mask sources, before any model loads (main process; data/masks.py reads and checks them),
and --face_masks: each training image's mask made from its detected faces (evaluate/faces.py's MTCNN).

A face mask is 1 inside every face box widened by --face_mask_margin x the box's size on each side, the
outer half of that margin a linear feather down to 0 (so margin 0.25 = full up to 12.5% out, 0 from 25%
out), 0 elsewhere. Masks are written once, atomically, as grayscale PNGs under OUTPUT_DIR/face_masks/ at
the image's place in the data folder (read back as a --conditioning_data_dir), with ``manifest.json``
recording each image's identity (path, size, mtime) and the margin: a rerun or resume reuses them, a
changed image or margin is detected again. An image without a face gets a full mask (trained unmasked)
and a warning line; with --strict_data it stops the run, as the data check does with bad samples.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..data.datacheck import SHOWN_PER_KIND
from ..data.latent_cache import image_identity
from ..data.main_process import from_main_process
from ..data.masks import FACE_MASK_FOLDER, masks_on, read_mask_sources, subset_mask_sources
from ..data.records import Records
from ..errors import UsageError
from ..faults import fsync_dir, write_atomically
from ..outputs.pictures import save_png

if TYPE_CHECKING:
    from ..config.settings import TrainConfig

MANIFEST_NAME = "manifest.json"


def face_mask(size: tuple[int, int], boxes, margin: float) -> np.ndarray:
    """(H, W) uint8 mask of an image of ``size`` (W, H): the max over the face ``boxes`` (x0, y0, x1, y1) of 1
    inside the box widened by margin/2 of its size, falling linearly to 0 at margin (see the module doc)."""
    width, height = size
    xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5  # pixel centres
    mask = np.zeros((height, width), dtype=np.float64)
    for x0, y0, x1, y1 in boxes:
        feather_x, feather_y = margin * (x1 - x0) / 2, margin * (y1 - y0) / 2
        # distance outside the inner (fully masked) box along each axis, in units of that axis' feather
        out_x = np.maximum(np.maximum(x0 - feather_x - xs, xs - (x1 + feather_x)), 0)
        out_y = np.maximum(np.maximum(y0 - feather_y - ys, ys - (y1 + feather_y)), 0)
        fall_x = out_x / feather_x if feather_x > 0 else np.where(out_x > 0, np.inf, 0)
        fall_y = out_y / feather_y if feather_y > 0 else np.where(out_y > 0, np.inf, 0)
        value = np.clip(1 - np.maximum(fall_y[:, None], fall_x[None, :]), 0, 1)
        mask = np.maximum(mask, value)
    return np.round(mask * 255).astype(np.uint8)


def mask_path(folder: Path, image: Path, root: Path) -> Path:
    """Where ``image``'s face mask goes: its place inside ``root``, as a .png (data.masks.find_mask_file's first try)."""
    try:
        relative = Path(image).resolve().relative_to(Path(root).resolve())
    except ValueError:
        relative = Path(Path(image).name)
    return folder / relative.parent / (relative.stem + ".png")


def make_face_masks(config: TrainConfig, records: Records, root: Path, stream=None) -> Path:
    """Writes the missing or stale face masks of every image in ``records`` under OUTPUT_DIR/face_masks/ (see the
    module doc); returns that folder. Images without a face are listed (fatal with --strict_data)."""
    from ..evaluate.faces import detect_faces, require

    require("eval")
    stream = stream or sys.stdout
    folder = Path(config.output_dir) / FACE_MASK_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    images = list(dict.fromkeys(Path(source) for source, _ in records.records))
    made, faceless = 0, []
    for image in images:
        path = mask_path(folder, image, root)
        key = str(path.relative_to(folder))
        wanted = {"image": image_identity(image), "margin": config.face_mask_margin}
        entry = manifest.get(key)
        if entry is None or {k: entry.get(k) for k in wanted} != wanted or not path.is_file():
            with Image.open(image) as opened:
                opened.load()
                faces = detect_faces(opened)
                size = opened.size
            pixels = face_mask(size, [f.box for f in faces], config.face_mask_margin) if faces else \
                np.full((size[1], size[0]), 255, dtype=np.uint8)  # no face: a full mask, trained unmasked
            save_png(Image.fromarray(pixels, mode="L"), path)
            entry = manifest[key] = {**wanted, "faces": len(faces)}
            made += 1
        if entry["faces"] == 0:
            faceless.append(image)
    write_atomically(folder / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True).encode())
    fsync_dir(folder)
    label = "error" if config.strict_data else "warning"
    for image in faceless[:SHOWN_PER_KIND]:
        suffix = " (--strict_data)" if config.strict_data else ": trained unmasked (a full mask)"
        print(f"  {label}: image {image}: no face found{suffix}", file=stream)
    if len(faceless) > SHOWN_PER_KIND:
        print(f"  ... and {len(faceless) - SHOWN_PER_KIND} more images without a face", file=stream)
    print(f"face masks: {made} made, {len(images) - made} reused, {len(faceless)} images without a face, in {folder}",
          file=stream)
    if faceless and config.strict_data:
        more = f" (and {len(faceless) - 1} more listed above)" if len(faceless) > 1 else ""
        raise UsageError(f"image {faceless[0]}: no face found for --face_masks{more}; remove it, draw its mask with "
                         "--masked_loss --conditioning_data_dir, or drop --strict_data to train it unmasked")
    return folder


def loss_mask_sources(config: TrainConfig, accelerator, records: Records, data_dir: Path | None = None) -> list | None:
    """Each record's mask source (data/masks.py), checked in one pass; the face masks made first. None without
    --masked_loss. Runs on the main process; the others receive its result (or its error)."""
    if not masks_on(config):
        return None
    root = Path(data_dir or config.train_data_dir) if (data_dir or config.train_data_dir) else None
    if records.subsets is not None:  # --dataset_config: the images' folders, wherever they are
        root = Path(os.path.commonpath([subset.image_dir.resolve() for subset in records.subsets]))

    def work():
        folder = None
        if config.face_masks:
            folder = make_face_masks(config, records, root)
        elif config.conditioning_data_dir is not None:
            folder = Path(config.conditioning_data_dir)
        if records.subsets is not None and not config.face_masks:
            return subset_mask_sources(config, records, folder)
        return read_mask_sources(config, records.records, records.names, records.sizes, root, folder)

    return from_main_process(accelerator, "checking the loss masks", work)


def check_face_mask_flags(config) -> None:
    if config.face_masks:
        from ..evaluate.faces import require

        try:
            require("eval")
        except UsageError:
            raise UsageError("--face_masks finds faces with OpenCV's MTCNN: pip install -e \".[eval]\" (or "
                             "pip install 'sat[eval]'), or give masks with --masked_loss --conditioning_data_dir"
                             ) from None
