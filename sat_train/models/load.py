"""Load a model's components: a diffusers folder or hub id (SD v1.5's or SDXL's layout, told apart by
the UNet), or a single-file checkpoint (single_file.py); --vae and --tokenizer_name replace those parts."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import UsageError
from . import single_file
from .components import Components
from .family import SDXL, family_of, family_of_folder

if TYPE_CHECKING:
    from ..config.settings import TrainConfig


def load_components(config: TrainConfig) -> Components:
    """A single-file checkpoint (models.single_file) or a diffusers folder / hub id; --vae and
    --tokenizer_name replace those components."""
    if single_file.is_checkpoint_path(config.pretrained_model_name_or_path):
        return single_file.load_single_file_components(config)
    components = load_folder_components(config)
    if config.vae is not None:
        components.vae = single_file.load_vae(config)
    if config.tokenizer_name is not None:
        components.tokenizer = single_file.load_tokenizer(config)
    return components


def load_folder_components(config: TrainConfig) -> Components:
    """--pretrained_model_name_or_path's folder or hub id (load_folder)."""
    return load_folder(config.pretrained_model_name_or_path, revision=config.revision, variant=config.variant,
                       cache_dir=config.cache_dir)


def load_folder(source: str, revision: str | None = None, variant: str | None = None,
                cache_dir: str | None = None) -> Components:
    """SD v1.5's parts (tokenizer/, text_encoder/, vae/, unet/, scheduler/), then those the UNet's family
    (models/family.py) adds: SDXL's tokenizer_2/ + text_encoder_2/ (CLIPTextModelWithProjection). Weights
    load in float32 whatever the files hold (diffusers' default; transformers' own would keep fp16 files'
    fp16): the run casts them to its --mixed_precision."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    check_model_source(source)
    common = {"revision": revision, "cache_dir": cache_dir}
    weights = {"variant": variant, **common}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=torch.float32, **weights)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **weights)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common)
        return Components(tokenizer, text_encoder, vae, unet, scheduler,
                          **family_of(unet).load_extra_parts(source, common, {**weights, "dtype": torch.float32}))
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on") and "connect" in first_line:
            first_line += " [HF_HUB_OFFLINE is set: download the model first or pass a local folder]"
        raise UsageError(f"cannot load Stable Diffusion from {source!r}: {first_line} (expected a hub id or "
                         f"a folder with {subfolder_list(SDXL.subfolders)} for SDXL, without the _2 ones for "
                         "SD v1.5)") from err


def subfolder_list(names) -> str:
    return ", ".join(name + "/" for name in names)


def check_model_source(source: str) -> None:
    """A local folder must have the subfolders of the family it looks like (checked before any loading,
    one clear message); a path-like source that does not exist is not sent to the hub as an id. (A
    single-file SDXL checkpoint is refused by single_file.py: pass the diffusers folder.)"""
    path = Path(source).expanduser()
    if path.is_dir():
        family = family_of_folder(path)
        missing = [name for name in family.subfolders if not (path / name).is_dir()]
        if missing:
            raise UsageError(f"--pretrained_model_name_or_path {source} is not {family.a_title} folder: "
                             f"missing {subfolder_list(missing)} (expected {subfolder_list(family.subfolders)})")
        check_recorded_checksums(path)
    elif path.exists():
        raise UsageError(f"--pretrained_model_name_or_path {source} is a file but not a checkpoint; pass a "
                         ".safetensors checkpoint, a folder or a hub id")
    elif source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source:
        raise UsageError(f"--pretrained_model_name_or_path {source}: no such folder (and not a hub id like "
                         "stable-diffusion-v1-5/stable-diffusion-v1-5)")



# A folder sat wrote (the bundled demo model: sat_train/assets/make_demo_model.py) records every file's SHA-256
CHECKSUMS_NAME = "sat_checksums.json"


def file_checksums(folder: Path) -> dict[str, str]:
    """{relative path: SHA-256} of every file under ``folder`` but the checksum record itself."""
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != CHECKSUMS_NAME}


def check_recorded_checksums(folder: Path) -> None:
    """When ``folder`` holds CHECKSUMS_NAME: every file it lists is there with that SHA-256 (a truncated,
    altered or missing file stops in one line naming it, before any weights load)."""
    record = folder / CHECKSUMS_NAME
    if not record.is_file():
        return
    expected = json.loads(record.read_text(encoding="utf-8"))
    found = file_checksums(folder)
    for name, digest in expected.items():
        if found.get(name) != digest:
            problem = "is missing" if name not in found else "is truncated or altered (its SHA-256 differs)"
            raise UsageError(f"{folder / name} {problem}: {CHECKSUMS_NAME} records every file of this model; "
                             "restore the file (the bundled demo model: reinstall sat, or git checkout "
                             "sat_train/assets/demo_model)")
