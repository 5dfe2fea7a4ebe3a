"""diffusers' DreamBooth class images (--with_prior_preservation --class_data_dir --class_prompt
--num_class_images): when the folder holds fewer than --num_class_images images, the base model (LoRA off)
generates the missing ones into it before training, as diffusers' train_dreambooth_lora.py does. This is the
one place a run writes outside --output_dir: the user named the folder.

Each image is written atomically (faults.write_atomically) as ``{index}-{sha1 of its bytes}.png`` (diffusers'
``{index}-{hash}.jpg`` naming, lossless), so a killed run leaves whole images only and a rerun counts them and
generates only what is still missing. Image ``index`` draws from its own generator, keyed by (--seed, index):
the same folder comes out however often generation is interrupted; the global generators are left as they were
(resume relies on them). Only the main process generates; the others wait for it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..data.datacheck import IMAGE_SUFFIXES
from ..data.main_process import from_main_process
from ..faults import write_atomically
from ..guide.capture import lora_disabled
from ..outputs.pictures import png_bytes
from ..outputs.samples import make_pipeline
from ..seeding import derived_generator

if TYPE_CHECKING:
    from ..config.settings import TrainConfig

CLASS_IMAGE_STREAM = 3  # last key of an image's generator: apart from every other stream of the seed
CLASS_IMAGE_STEPS = 50  # diffusers' pipeline default, which its DreamBooth example uses
CLASS_IMAGE_CFG = 7.5


def class_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def generate_class_images(folder: Path, prompt: str, wanted: int, components, size: tuple[int, int], seed: int,
                          batch_size: int = 4, steps: int = CLASS_IMAGE_STEPS, progress: bool = True) -> int:
    """Generates the images ``folder`` lacks to hold ``wanted``, with ``components``' pipeline (every LoRA off)
    at ``size`` (W, H); returns how many it wrote."""
    folder.mkdir(parents=True, exist_ok=True)
    have = len(class_images(folder))
    missing = max(0, wanted - have)
    if not missing:
        return 0
    pipeline = make_pipeline(components, "ddim")
    indices = list(range(have, wanted))
    with torch.random.fork_rng(devices=[]), lora_disabled(components.unet), \
            tqdm(total=missing, desc="generating class images", unit="image", disable=not progress) as bar:
        for start in range(0, missing, batch_size):
            chunk = indices[start:start + batch_size]
            generators = [derived_generator(seed, index, CLASS_IMAGE_STREAM) for index in chunk]
            images = pipeline([prompt] * len(chunk), num_inference_steps=steps, guidance_scale=CLASS_IMAGE_CFG,
                              width=size[0], height=size[1], generator=generators).images
            for index, image in zip(chunk, images):
                data = png_bytes(image)
                write_atomically(folder / f"{index}-{hashlib.sha1(data).hexdigest()}.png", data)
                bar.update(1)
    return missing


def ensure_class_images(config: TrainConfig, accelerator, components) -> None:
    """--with_prior_preservation: --class_data_dir filled up to --num_class_images by the main process."""
    folder = Path(config.class_data_dir)

    def work() -> int:
        return generate_class_images(folder, config.class_prompt, config.num_class_images, components,
                                     tuple(config.resolution_wh), config.seed or 0,
                                     batch_size=config.train_batch_size)

    written = from_main_process(accelerator, "generating class images", work)
    if written:
        accelerator.print(f"generated {written} class images into --class_data_dir {folder}")
