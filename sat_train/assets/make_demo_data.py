"""Exports the bundled demo images (run once by a maintainer; never at training time).

    python sat_train/assets/make_demo_data.py

Writes sat_train/assets/demo_data/ as an imagefolder: six 128x128 JPEGs and metadata.jsonl
({"file_name", "text"}), read by the same loader as user data. Sources, both in the
scikit-image wheel (no download) and free of copyright restrictions:
  - skimage.data.astronaut(): Eileen Collins, NASA photo, public domain.
  - skimage.data.camera(): "cameraman", by Lav Varshney, CC0.
The variants are half-body and head-and-shoulders crops, a mirror and a warm tint, so the demo
batch holds faces at several scales.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from skimage import data

SIZE = 128
OUT = Path(__file__).with_name("demo_data")


def crop(img: np.ndarray, top: int, left: int, size: int) -> Image.Image:
    return Image.fromarray(img[top : top + size, left : left + size]).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)


def warm(img: Image.Image) -> Image.Image:
    r, g, b = img.split()
    return Image.merge("RGB", (r.point(lambda v: min(255, int(v * 1.08))), g, b.point(lambda v: int(v * 0.9))))


def main() -> None:
    astronaut, camera = data.astronaut(), data.camera()
    samples = [
        (crop(astronaut, 0, 0, 512),
         "a half-body photo of a smiling woman astronaut in a spacesuit, face, eyes, short brown hair"),
        (crop(astronaut, 0, 96, 320),
         "a head and shoulders portrait of a woman astronaut, detailed face, brown eyes, short hair"),
        (ImageOps.mirror(crop(astronaut, 16, 40, 400)),
         "a portrait photo of a smiling woman, face, eyes, hair, american flag behind"),
        (warm(crop(astronaut, 24, 150, 256)),
         "a close-up photo of a woman's face, brown eyes, short brown hair, warm light"),
        (crop(camera, 0, 0, 512),
         "a black and white half-body photo of a man with a camera, face, eyes, dark hair"),
        (crop(camera, 20, 150, 300),
         "a black and white portrait of a man in a coat, face, eyes, short dark hair"),
    ]
    OUT.mkdir(exist_ok=True)
    lines = []
    for i, (image, caption) in enumerate(samples):
        name = f"person_{i:02d}.jpg"
        image.save(OUT / name, quality=88, optimize=True)
        lines.append(json.dumps({"file_name": name, "text": caption}))
    (OUT / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(samples)} images to {OUT}")


if __name__ == "__main__":
    main()
