"""Generate images with a trained LoRA: ``python -m sat_train.sample --lora OUTPUT_DIR --prompt "..."``.

The base model (SD v1.5 or SDXL) is --pretrained_model_name_or_path, else the one recorded in
OUTPUT_DIR's train_config.json, else (a demo run) the embedded demo model (the tiny SDXL when the
run recorded ``"demo_model": "sdxl"``). ``--sag_scale > 0`` adds self-attention guidance
(sat_train.guide.sag: mask from q/k inside memory-efficient attention, fused degrade). The size is
--resolution (one int, or W,H as kohya's) or --width/--height, by default the model's (SDXL's
1024 px). Seeded and deterministic; writes PNGs to --output_dir (default OUTPUT_DIR/samples).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .config.settings import TrainConfig
from .errors import UsageError
from .outputs.checkpoints import CONFIG_NAME, checkpoint_step
from .outputs.lora_files import find_lora_file, load_pipeline_lora


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sat_train.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--lora", required=True, help="A training output_dir (or a LoRA .safetensors file).")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative_prompt", default="")
    add_base_model_arguments(p)
    p.add_argument("--sag_scale", type=float, default=0.75, help="Self-attention guidance scale; 0 = off.")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale.")
    p.add_argument("--lora_scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_images", type=int, default=1)
    p.add_argument("--num_inference_steps", type=int, default=30)
    p.add_argument("--resolution", default=None,
                   help="Image size: one int (square) or W,H (e.g. 832,1216); default: the model's (SDXL: 1024).")
    p.add_argument("--width", "--W", type=int, default=None, help="Image width (instead of --resolution).")
    p.add_argument("--height", "--H", type=int, default=None, help="Image height (instead of --resolution).")
    p.add_argument("--sag_layer", default=None,
                   help="The self-attention layer whose mass makes SAG's mask (default: "
                   "mid_block.attentions[0].transformer_blocks[0].attn1, the one SAC trains with).")
    p.add_argument("--attention_backend", default="auto", choices=("auto", "xformers", "sdpa", "eager"))
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available).")
    p.add_argument("--output_dir", default=None, help="Where PNGs go (default: LORA/samples).")
    return p


def add_base_model_arguments(p: argparse.ArgumentParser) -> None:
    """The base model's flags (here and in ``python -m sat_train.compare``)."""
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="Base SD v1.5 or SDXL model (default: the one the LoRA was trained on; the demo model for "
                   "a demo run).")
    p.add_argument("--revision", default=None, help="The base model's hub revision: a branch, tag or commit.")
    p.add_argument("--variant", default=None, help="The base model's weights variant, e.g. fp16.")
    p.add_argument("--cache_dir", default=None, help="Where hub downloads are cached (default: Hugging Face's).")
    p.add_argument("--vae", "--pretrained_vae_model_name_or_path", dest="vae", default=None,
                   help="VAE replacing the base model's (default: the run's): a diffusers folder or a .safetensors.")
    p.add_argument("--original_config", default=None, help="Single-file base: its LDM .yaml (default: the run's).")
    p.add_argument("--single_file_config", default=None,
                   help="Single-file base: a diffusers config folder describing it (default: the run's).")
    p.add_argument("--tokenizer_name", default=None, help="CLIP tokenizer folder (default: the run's).")
    p.add_argument("--allow_pickle_checkpoint", action="store_true", default=None,
                   help="Allow .ckpt/.pt/.pth checkpoints (pickles can run code when loaded).")


def recorded_settings(lora: Path) -> dict:
    """The training run's train_config.json next to the LoRA, or in the run folder a checkpoint-N folder is
    in ({} when there is none)."""
    folder = lora if lora.is_dir() else lora.parent
    if not (folder / CONFIG_NAME).is_file() and checkpoint_step(folder) is not None:
        folder = folder.parent
    config_file = folder / CONFIG_NAME
    return json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}


def base_model(args, lora: Path) -> str | None:
    if args.pretrained_model_name_or_path:
        return args.pretrained_model_name_or_path
    return recorded_settings(lora).get("pretrained_model_name_or_path")


def model_settings(args, lora: Path) -> dict:
    """--vae and the single-file flags: those given here, else the run's when its base model is used."""
    from .models.single_file import MODEL_FIELDS

    recorded = {} if args.pretrained_model_name_or_path else recorded_settings(lora)
    settings = {name: recorded[name] for name in MODEL_FIELDS if recorded.get(name) is not None}
    settings.update({name: getattr(args, name) for name in MODEL_FIELDS if getattr(args, name) is not None})
    return settings


def load_base_components(args, lora: Path, source: str | None):
    """The base model: the embedded demo model the run recorded (``demo_model``: SD v1.5- or SDXL-shaped)
    when there is no ``source``, else what models.load_components reads (SD v1.5 and SDXL folders and hub
    ids, single files)."""
    from . import demo
    from .models.load import load_components
    from .models.single_file import check_model_flags

    if source is None:
        return demo.build_demo_components(recorded_settings(lora).get("demo_model", "sd15"))
    config = TrainConfig(pretrained_model_name_or_path=source, revision=args.revision, variant=args.variant,
                         cache_dir=args.cache_dir, **model_settings(args, lora))
    check_model_flags(config)
    return load_components(config)


def load_pipeline_components(args, device):
    """(components with the LoRA loaded, the base model's source): diffusers' load_lora_weights (diffusers
    or kohya keys; StableDiffusionXLPipeline's for an SDXL base); a LoRA that does not fit stops in one line."""
    lora = Path(args.lora)
    lora_file = find_lora_file(lora)
    source = base_model(args, lora)
    components = load_base_components(args, lora, source)
    pipe = components.pipeline()
    load_pipeline_lora(pipe, lora_file, "sat")
    pipe.set_adapters(["sat"], adapter_weights=[args.lora_scale])
    for model in (components.unet, components.vae, *components.text_encoders):
        model.to(device).eval()
    return components, source


def image_size(args) -> tuple[int | None, int | None]:
    """(width, height) from --resolution (an int, or W,H) or --width/--height; None: the model's default.
    With SAG, a side below what its blur needs is refused here rather than by the kernel mid-sampling."""
    return requested_size(args.resolution, args.width, args.height, args.sag_scale)


def requested_size(resolution: str | None, width: int | None = None, height: int | None = None,
                   sag_scale: float = 0.0) -> tuple[int | None, int | None]:
    """image_size's values: --resolution (an int, or W,H) or --width/--height, checked."""
    from .outputs.sample_prompts import SAG_MIN_SIZE, read_size

    if resolution is not None and (width is not None or height is not None):
        raise UsageError(f"--resolution {resolution} and --width/--height both give the size; keep one "
                         "(--resolution W,H or --width W --height H)")
    if resolution is not None:
        width, height = TrainConfig(resolution=resolution).resolution_wh
        flags = ("--resolution", "--resolution")
    else:
        flags = ("--width", "--height")
    size = tuple(None if side is None else read_size(str(side), flag)
                 for side, flag in zip((width, height), flags, strict=True))
    given = [side for side in size if side is not None]
    if sag_scale > 0 and given and min(given) < SAG_MIN_SIZE:
        raise UsageError(f"--sag_scale needs images of at least {SAG_MIN_SIZE} px a side (its blur is 9 latents "
                         f"wide), got {' x '.join(map(str, given))} from {flags[0]}; give a larger size or "
                         "--sag_scale 0")
    return size


def pick_device(name: str | None) -> torch.device:
    """--device, by default cuda when there is one."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def main(argv: list[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    from .guide.capture import sac_layer
    from .guide.sag import sag_sample
    from .outputs.pictures import save_png

    try:
        if args.num_images < 1 or args.num_inference_steps < 1:
            raise UsageError("--num_images and --num_inference_steps must be >= 1")
        width, height = image_size(args)
        device = pick_device(args.device)
        components, source = load_pipeline_components(args, device)
        # checked as training's --sac_layer: a cross-attention map (77 tokens wide) would stop SAG mid-sampling
        layer = None if args.sag_layer is None else sac_layer(components.unet, args.sag_layer, "--sag_layer")
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        images = sag_sample(components, args.prompt, args.negative_prompt, args.num_images, height, width,
                            args.num_inference_steps, args.guidance_scale, args.sag_scale, generator,
                            args.attention_backend, self_attention=layer)
    except UsageError as err:
        print(f"sat_train.sample: error: {err}", file=sys.stderr)
        sys.exit(2)
    lora = Path(args.lora)
    out = Path(args.output_dir) if args.output_dir else (lora if lora.is_dir() else lora.parent) / "samples"
    paths = [save_png(image, out / f"seed{args.seed}-sag{args.sag_scale:g}-{i}.png") for i, image in enumerate(images)]
    print(f"base model: {source or 'embedded demo model'}; wrote {len(paths)} image(s) to {out}")
    return paths


if __name__ == "__main__":
    main()
