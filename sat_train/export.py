"""LoRA weights ↔ diffusers' format (``pytorch_lora_weights.safetensors``, what
``StableDiffusionPipeline.load_lora_weights`` reads, or SDXL's pipeline for SDXL), as diffusers' LoRA
examples write them; and the kohya file (A1111 / ComfyUI), whose SDXL UNet keys use the original
SGM UNet's block names."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .faults import crash_hook, write_atomically
from .lora_files import cast_state_dict, precision_dtype, precision_overflow

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def unet_lora_state_dict(unet) -> dict:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def unet_lora_adapter_metadata(unet) -> dict:
    """The adapter's peft LoraConfig (rank, lora_alpha, lora_dropout, target modules), as diffusers'
    training examples record it: ``load_lora_weights`` builds its LoraConfig from it, so the scale
    alpha / rank is the trained one (a file without it is read as alpha = rank)."""
    return unet.peft_config["default"].to_dict()


def lora_pipeline_class(sdxl: bool):
    """The pipeline whose save_lora_weights / lora_state_dict handle the family's files (SDXL's knows
    ``text_encoder_2``)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline


def save_lora(unet, output_dir: str | os.PathLike, precision: str = "float", text_encoder=None,
              text_encoder_2=None, sdxl: bool = False) -> Path:
    """Writes ``output_dir/pytorch_lora_weights.safetensors`` atomically (temp folder + os.replace),
    so an interrupted save never leaves a truncated file where a good one was. Its safetensors header
    carries the adapter metadata (``lora_adapter_metadata``, keys prefixed ``unet.``). ``precision``
    (--save_precision) is for exports; checkpoints keep float, so that resume is exact. With
    ``text_encoder`` (--train_text_encoder), its LoRA too (``text_encoder.*`` keys and metadata), and
    SDXL's ``text_encoder_2``'s (``text_encoder_2.*``); ``sdxl`` picks SDXL's pipeline to write it."""
    from .text_encoder import text_encoder_save_kwargs

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / LORA_WEIGHTS_NAME
    layers = cast_state_dict(unet_lora_state_dict(unet), precision)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".lora-") as tmp:
        lora_pipeline_class(sdxl).save_lora_weights(save_directory=tmp, unet_lora_layers=layers,
                                                    unet_lora_adapter_metadata=unet_lora_adapter_metadata(unet),
                                                    safe_serialization=True,
                                                    **text_encoder_save_kwargs(text_encoder, precision, text_encoder_2))
        if not output_dir.name.startswith(".checkpoint-"):  # the final file, not a checkpoint's copy
            crash_hook("lora:mid")  # test-only (sat_train/faults.py)
        os.replace(Path(tmp) / LORA_WEIGHTS_NAME, final)
    return final


def load_lora(unet, folder: str | os.PathLike, sdxl: bool = False) -> None:
    """Loads ``folder/pytorch_lora_weights.safetensors`` into ``unet``'s existing "default" adapter."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    # use_safetensors=True: never falls back to unpickling a .bin (diffusers does when it is left unset)
    state_dict, _, metadata = lora_pipeline_class(sdxl).lora_state_dict(
        str(folder), weight_name=LORA_WEIGHTS_NAME, use_safetensors=True, return_lora_metadata=True)
    check_same_alpha(unet, metadata, folder)
    unet_state = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    peft_state = convert_unet_state_dict_to_peft(unet_state)
    check_lora_fits(unet, peft_state, folder)  # the keys and shapes are the UNet's: nothing unexpected is left
    set_peft_model_state_dict(unet, peft_state, adapter_name="default")


def check_same_alpha(unet, metadata: dict | None, folder) -> None:
    """A checkpoint resumed under another --lora_alpha would load its A, B at the wrong scale and
    silently train a different model; files written before alpha was recorded carry no metadata."""
    from .config import UsageError

    saved = (metadata or {}).get("unet.lora_alpha")
    current = unet.peft_config["default"].lora_alpha
    if saved is not None and float(saved) != float(current):
        raise UsageError(f"{folder} was trained with --lora_alpha {float(saved):g}, this run has {float(current):g}: "
                         "resume with the same --lora_alpha (and --rank)")


def check_lora_fits(unet, peft_state: dict, folder) -> None:
    """A checkpoint whose LoRA has other modules or shapes than ``unet``'s (another base model, such as
    SD v1.5's LoRA in an SDXL run, or another --rank) would stop torch's load_state_dict with a
    traceback, or leave the modules it lacks as they started: refused, naming the fix."""
    from peft.utils import get_peft_model_state_dict

    from .config import UsageError

    expected = {key: tuple(value.shape) for key, value in get_peft_model_state_dict(unet).items()}
    saved = {key: tuple(value.shape) for key, value in peft_state.items()}
    if saved == expected:
        return
    differing = sorted(saved.keys() ^ expected.keys()) or sorted(k for k in saved if saved[k] != expected[k])
    raise UsageError(f"{folder} holds a LoRA that does not fit this UNet ({len(differing)} tensors differ in name or "
                     f"shape, e.g. {differing[0]}): resume with the base model and --rank of the run that saved "
                     "it, or train into another --output_dir")


# ----------------------------------------------------------------------------- kohya

KOHYA_WEIGHTS_NAME = "pytorch_lora_weights_kohya.safetensors"


def kohya_state_dict(unet, prefix: str = "unet") -> dict:
    """The UNet LoRA in kohya / A1111 / ComfyUI keys: ``lora_unet_<module>.lora_down.weight`` (A),
    ``.lora_up.weight`` (B) and ``.alpha``, via diffusers' ``convert_state_dict_to_kohya`` (which
    wants peft keys prefixed ``unet.``, or ``prefix.``); alpha is the adapter's lora_alpha, as a
    float32 scalar."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    peft_state = {f"{prefix}.{k}": v.detach().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    state = convert_state_dict_to_kohya(peft_state)
    alpha = float(unet.peft_config["default"].lora_alpha)
    return {k: (torch.tensor(alpha, dtype=torch.float32) if k.endswith(".alpha") else v.contiguous())
            for k, v in state.items()}


def sgm_block_names(config) -> dict[str, str]:
    """kohya's SDXL names of the UNet's attention blocks: diffusers' block (underscored, as
    convert_state_dict_to_kohya writes it) → the original SGM UNet's, whose module names sd-scripts'
    sdxl_train_network trains on (library/sdxl_original_unet.py) and ComfyUI's LoRA key map reads
    (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``). SGM numbers blocks in order:
    input_blocks[0] is conv_in, then each level's layers [resnet, attention] and, but after the last
    level, its downsampler; middle_block is [resnet, attention, resnet]; output_blocks has
    layers_per_block + 1 layers per level [resnet, attention, upsampler]. Derived from ``config``,
    so any number of levels and layers maps (the tiny test model's too)."""
    levels = len(config.block_out_channels)
    layers = config.layers_per_block
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * levels
    names = {"mid_block_attentions_0_": "middle_block_1_"}
    index = 1
    for level in range(levels):
        for j in range(layers[level]):
            names[f"down_blocks_{level}_attentions_{j}_"] = f"input_blocks_{index}_1_"
            index += 1
        index += level < levels - 1  # the downsampler's block
    index = 0
    for level, count in enumerate(reversed(layers)):  # up_blocks[0] is the lowest resolution
        for j in range(count + 1):
            names[f"up_blocks_{level}_attentions_{j}_"] = f"output_blocks_{index}_1_"
            index += 1
    return names


def unet_kohya_state_dict(unet, sdxl: bool = False) -> dict:
    """The UNet's ``lora_unet_*`` tensors: diffusers' block names for SD v1.5 (what A1111 and ComfyUI
    read for it), the SGM names for SDXL (what sd-scripts writes for SDXL)."""
    state = kohya_state_dict(unet)
    if not sdxl:
        return state
    blocks = sgm_block_names(unet.config)
    renamed = {}
    for key, value in state.items():
        name = key.removeprefix("lora_unet_")
        block = next((b for b in blocks if name.startswith(b)), None)
        if block is None:
            raise ValueError(f"no SGM name for the UNet's LoRA module {key} (only attention blocks have one)")
        renamed["lora_unet_" + blocks[block] + name[len(block):]] = value
    return renamed


def save_lora_kohya(unet, output_dir: str | os.PathLike, precision: str = "float", describe=None,
                    crash_point: str | None = None, text_encoder=None, text_encoder_2=None,
                    sdxl: bool = False) -> Path:
    """Writes ``output_dir/pytorch_lora_weights_kohya.safetensors`` atomically, its tensors in
    ``precision``; ``describe(state)`` gives its header metadata (lora_files.kohya_file_metadata),
    else only kohya's two format keys. With ``text_encoder``: its ``lora_te_*`` keys too (SDXL's
    ``lora_te1_*`` / ``lora_te2_*`` with ``text_encoder_2``); ``sdxl``: SGM UNet names."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state = cast_state_dict(all_kohya_state_dict(unet, text_encoder, text_encoder_2, sdxl), precision)
    metadata = describe(state) if describe is not None else {"format": "pt", "ss_network_module": "networks.lora"}
    from safetensors.torch import save

    return write_atomically(output_dir / KOHYA_WEIGHTS_NAME, save(state, metadata=metadata), crash_point)


def all_kohya_state_dict(unet, text_encoder=None, text_encoder_2=None, sdxl: bool = False) -> dict:
    """The kohya file's tensors: the UNet's ``lora_unet_*`` and (when they train) the text encoders' ``lora_te*_``."""
    from .text_encoder import text_encoder_kohya_state_dict

    return {**unet_kohya_state_dict(unet, sdxl), **text_encoder_kohya_state_dict(text_encoder, text_encoder_2)}


def export_precision_problem(unet, export_format: str, precision: str, text_encoder=None, text_encoder_2=None,
                             sdxl: bool = False) -> str | None:
    """What keeps the LoRA from being exported in ``precision`` (a tensor beyond its range), or None.
    Both formats hold the same values (A, B, alpha), so one state dict answers for both."""
    if precision_dtype(precision) is None:  # float: saved as trained, nothing to check (or to build)
        return None
    return precision_overflow(all_kohya_state_dict(unet, text_encoder, text_encoder_2, sdxl), precision)


def export_lora(unet, output_dir: str | os.PathLike, export_format: str = "diffusers", precision: str = "float",
                describe_kohya=None, text_encoder=None, text_encoder_2=None, sdxl: bool = False) -> Path:
    """The end-of-run export: ``diffusers``, ``kohya`` or ``both``, in --save_precision ``precision``
    (check export_precision_problem first), with the text encoders' LoRA in each file when given
    (``sdxl``: the SDXL files); returns the diffusers file when written, else the kohya one."""
    encoders = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "sdxl": sdxl}
    paths = []
    if export_format in ("diffusers", "both"):
        paths.append(save_lora(unet, output_dir, precision, **encoders))
    if export_format in ("kohya", "both"):
        paths.append(save_lora_kohya(unet, output_dir, precision, describe_kohya, crash_point="kohya:mid",
                                     **encoders))
    if not paths:
        raise ValueError(f"unknown export format {export_format!r}")
    return paths[0]
