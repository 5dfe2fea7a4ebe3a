"""LoRA weights ↔ files: diffusers' ``pytorch_lora_weights.safetensors`` (what the family's pipeline's
``load_lora_weights`` reads), as diffusers' LoRA examples write it, and the kohya file (A1111 /
ComfyUI). The UNet's adapter, and (with --train_text_encoder) the text encoders' in the same file.
diffusers' file goes through the family's LoRA loader mixin (what its pipeline inherits) without
importing the pipeline modules.

Which keys a family writes is its object's (models/family.py), found from the UNet: the pipeline class,
the text encoders' prefixes (diffusers: ``text_encoder.*`` and SDXL's ``text_encoder_2.*``; kohya: SD
v1.5's ``lora_te_*``, SDXL's ``lora_te1_*`` / ``lora_te2_*``, the names sd-scripts writes and ComfyUI's
key map reads) and the kohya UNet names (SDXL's: the original SGM UNet's blocks). ``text_encoders`` is
the trained text encoders in the family's order (``Components.text_encoders``), empty when none trains;
an entry may be None (that encoder's LoRA is left out). Text-encoder keys follow CLIPTextModel's names
(``text_model.encoder.layers.N...``): recent transformers flatten CLIPTextModel (no ``text_model``
level), diffusers' loader strips the prefix again for such models, and A1111/ComfyUI expect it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import UsageError
from ..faults import crash_hook, write_atomically
from .kohya_metadata import cast_state_dict, precision_dtype, precision_overflow

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_NAME = "pytorch_lora_weights_kohya.safetensors"
EXPORT_FORMATS = ("diffusers", "kohya", "both")


def unet_lora_state_dict(unet) -> dict:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def unet_lora_adapter_metadata(unet) -> dict:
    """The adapter's peft LoraConfig (rank, lora_alpha, lora_dropout, target modules), as diffusers'
    training examples record it: ``load_lora_weights`` builds its LoraConfig from it, so the scale
    alpha / rank is the trained one (a file without it is read as alpha = rank)."""
    return unet.peft_config["default"].to_dict()


def unet_family(unet):
    """The family of the model whose LoRA is written (models/family.py; imported on use: the flags read
    EXPORT_FORMATS without torch)."""
    from ..models.family import family_of

    return family_of(unet)


def trained_text_encoders(unet, text_encoders) -> list[tuple[str, int, object]]:
    """(diffusers key prefix, index in the family, model) of each text encoder given (None skipped)."""
    prefixes = unet_family(unet).lora_file_prefixes
    return [(prefix, i, model) for i, (prefix, model) in enumerate(zip(prefixes, text_encoders)) if model is not None]


def save_lora(unet, output_dir: str | os.PathLike, precision: str = "float", text_encoders=()) -> Path:
    """Writes ``output_dir/pytorch_lora_weights.safetensors`` atomically (temp folder + os.replace),
    so an interrupted save never leaves a truncated file where a good one was. Its safetensors header
    carries the adapter metadata (``lora_adapter_metadata``, keys prefixed ``unet.``). ``precision``
    (--save_precision) is for exports; checkpoints keep float, so that resume is exact. With
    ``text_encoders``, their LoRA too (each one's keys and metadata), written by the family's LoRA loader."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / LORA_WEIGHTS_NAME
    layers = cast_state_dict(unet_lora_state_dict(unet), precision)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".lora-") as tmp:
        unet_family(unet).lora_loader_class().save_lora_weights(
            save_directory=tmp, unet_lora_layers=layers, unet_lora_adapter_metadata=unet_lora_adapter_metadata(unet),
            safe_serialization=True, **text_encoder_save_kwargs(unet, text_encoders, precision))
        if not output_dir.name.startswith(".checkpoint-"):  # the final file, not a checkpoint's copy
            crash_hook("lora:mid")  # test-only (sat_train/faults.py)
        os.replace(Path(tmp) / LORA_WEIGHTS_NAME, final)
    return final


def load_lora(unet, folder: str | os.PathLike) -> None:
    """Loads ``folder/pytorch_lora_weights.safetensors`` into ``unet``'s existing "default" adapter."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    # use_safetensors=True: never falls back to unpickling a .bin (diffusers does when it is left unset)
    state_dict, _, metadata = unet_family(unet).lora_loader_class().lora_state_dict(
        str(folder), weight_name=LORA_WEIGHTS_NAME, use_safetensors=True, return_lora_metadata=True)
    check_same_alpha(unet, metadata, folder)
    unet_state = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    peft_state = convert_unet_state_dict_to_peft(unet_state)
    check_lora_fits(unet, peft_state, folder)  # the keys and shapes are the UNet's: nothing unexpected is left
    set_peft_model_state_dict(unet, peft_state, adapter_name="default")


def check_same_alpha(unet, metadata: dict | None, folder) -> None:
    """A checkpoint resumed under another --lora_alpha would load its A, B at the wrong scale and
    silently train a different model; files written before alpha was recorded carry no metadata."""
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

    expected = {key: tuple(value.shape) for key, value in get_peft_model_state_dict(unet).items()}
    saved = {key: tuple(value.shape) for key, value in peft_state.items()}
    if saved == expected:
        return
    differing = sorted(saved.keys() ^ expected.keys()) or sorted(k for k in saved if saved[k] != expected[k])
    raise UsageError(f"{folder} holds a LoRA that does not fit this UNet ({len(differing)} tensors differ in name or "
                     f"shape, e.g. {differing[0]}): resume with the base model and --rank of the run that saved "
                     "it, or train into another --output_dir")


def find_lora_file(lora: Path, flag: str = "--lora") -> Path:
    """``lora`` itself when it is a file, else the LoRA file a run or checkpoint folder holds (diffusers'
    first, then kohya's)."""
    if lora.is_file():
        if lora.suffix.lower() != ".safetensors":  # other formats are pickles, which can run code when loaded
            raise UsageError(f"{flag} {lora}: LoRA files are read only as .safetensors; convert it or pass the "
                             ".safetensors file")
        return lora
    if not lora.exists():
        raise UsageError(f"{flag} {lora}: no such file or folder; pass a training output_dir, a checkpoint-N "
                         "folder or a LoRA .safetensors file")
    for name in (LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME):
        if (lora / name).is_file():
            return lora / name
    raise UsageError(f"{flag} {lora}: no {LORA_WEIGHTS_NAME} or {KOHYA_WEIGHTS_NAME} there; pass a training "
                     "output_dir or a LoRA .safetensors file")


def load_pipeline_lora(pipe, lora_file: Path, adapter_name: str, flag: str = "--lora") -> None:
    """``lora_file`` (diffusers or kohya keys) into ``pipe`` (the family's pipeline) with diffusers'
    ``load_lora_weights``, as adapter ``adapter_name``. A LoRA that does not fit the UNet (another family's,
    another base model's, inconsistent ranks) raises inside diffusers with a long traceback, or loads only
    the layers whose names match: either stops here with one line."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from peft.utils import get_peft_model_state_dict

    verbosity = diffusers_logging.get_verbosity()
    # "no LoRA keys for the text encoder" is expected; a failed load's own log line would repeat our message
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            # peft's "inconsistency between the config and the state_dict": the count below says it in one line
            warnings.simplefilter("ignore", RuntimeWarning)
            expected = lora_unet_tensor_count(pipe, lora_file)
            pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name=adapter_name)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise UsageError(f"{flag} {lora_file} does not fit this {pipe_family_title(pipe)} base model "
                         f"({first_reason(err)}); pass a LoRA trained on this base model (SD v1.5 and SDXL LoRAs "
                         "do not mix)") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    loaded = len(get_peft_model_state_dict(pipe.unet, adapter_name=adapter_name)) if expected else 0
    if loaded < expected:
        pipe.unload_lora_weights()
        raise UsageError(f"{flag} {lora_file} does not fit this {pipe_family_title(pipe)} base model (only "
                         f"{loaded} of its {expected} UNet tensors found their layer); pass a LoRA trained on this "
                         "base model (SD v1.5 and SDXL LoRAs do not mix)")


def lora_unet_tensor_count(pipe, lora_file: Path) -> int:
    """How many UNet tensors ``lora_file`` holds, read as the pipeline reads it (kohya keys converted)."""
    state = pipe.lora_state_dict(str(lora_file.parent), weight_name=lora_file.name, use_safetensors=True)
    state = state[0] if isinstance(state, tuple) else state
    return sum(1 for key in state if key.startswith("unet."))


def pipe_family_title(pipe) -> str:
    return unet_family(pipe.unet).a_title.split(" ", 1)[1]  # "an SDXL" -> "SDXL"


def first_reason(err: Exception) -> str:
    """The informative line of a load error: torch's "size mismatch for ..." (its first line is a header)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = next((line for line in lines if not line.endswith(":")), lines[0] if lines else type(err).__name__)
    return reason if len(reason) <= 200 else reason[:197] + "..."


# ----------------------------------------------------------------------------- the text encoders' part


def _canonical_prefix(text_encoder) -> str:
    """"text_model." where the model is flattened (recent transformers), so keys read as SD v1.5's."""
    return "" if hasattr(text_encoder, "text_model") else "text_model."


def text_encoder_lora_state_dict(text_encoder) -> dict:
    """The text encoder's LoRA in diffusers' keys (as diffusers' train_dreambooth_lora saves it)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    prefix = _canonical_prefix(text_encoder)
    return convert_state_dict_to_diffusers({prefix + k: v for k, v in get_peft_model_state_dict(text_encoder).items()})


def text_encoder_save_kwargs(unet, text_encoders, precision: str = "float") -> dict:
    """What the family's ``save_lora_weights`` takes for the text encoders that train (nothing when none
    does): each one's LoRA (in --save_precision ``precision``) and its peft LoraConfig, from which
    ``load_lora_weights`` builds the adapter (so alpha / rank survives)."""
    kwargs = {}
    for prefix, _, model in trained_text_encoders(unet, text_encoders):
        name = prefix.rstrip(".")
        kwargs[f"{name}_lora_layers"] = cast_state_dict(text_encoder_lora_state_dict(model), precision)
        kwargs[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    return kwargs


def text_encoder_kohya_state_dict(unet, text_encoders) -> dict:
    """The text encoders' LoRA in kohya's keys, e.g. SD v1.5's
    ``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` + ``.lora_down.weight`` / ``.lora_up.weight``
    / ``.alpha``; empty when none trains. diffusers' converter names the i-th ``lora_te{i+1}_``: renamed
    to the family's kohya prefix."""
    kohya_prefixes = unet_family(unet).kohya_text_prefixes
    state = {}
    for prefix, index, model in trained_text_encoders(unet, text_encoders):
        converted = kohya_state_dict(model, prefix=(prefix + _canonical_prefix(model)).rstrip("."))
        state.update({kohya_prefixes[index] + k.removeprefix(f"lora_te{index + 1}_"): v for k, v in converted.items()})
    return state


def check_checkpoint_text_encoder(folder: str | os.PathLike, trains_text_encoder: bool, unet) -> None:
    """A checkpoint resumed with the other --train_text_encoder setting would lose the text encoders'
    LoRA or start it anew (and its optimizer state would not match): refused, naming the fix. Every
    text encoder of the family (``unet``'s) must have its keys there, or none."""
    from safetensors import safe_open

    prefixes = unet_family(unet).lora_file_prefixes
    with safe_open(str(Path(folder) / LORA_WEIGHTS_NAME), "pt") as f:
        found = {prefix for key in f.keys() for prefix in prefixes if key.startswith(prefix)}
    saved = bool(found)
    if saved and found != set(prefixes):
        raise UsageError(f"{folder} holds the LoRA of only one of SDXL's text encoders ({', '.join(sorted(found))}"
                         "*): resume from a checkpoint this trainer saved with --train_text_encoder")
    if saved != trains_text_encoder:
        raise UsageError(f"{folder} was saved {'with' if saved else 'without'} --train_text_encoder, this run "
                         f"has it {'off' if saved else 'on'}: resume with the same --train_text_encoder setting")


def load_text_encoder_loras(unet, text_encoders, folder: str | os.PathLike) -> None:
    """Each text encoder's keys of ``folder/pytorch_lora_weights.safetensors`` into its existing "default"
    adapter (a checkpoint's, at resume)."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(Path(folder) / LORA_WEIGHTS_NAME))
    for file_prefix, _, text_encoder in trained_text_encoders(unet, text_encoders):
        prefix = file_prefix + _canonical_prefix(text_encoder)
        saved = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
        # to diffusers' keys, then peft's (whatever the file holds), as diffusers' _set_state_dict_into_text_encoder
        peft_state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(saved))
        result = set_peft_model_state_dict(text_encoder, peft_state, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"checkpoint {folder} has text encoder LoRA keys this model lacks: {unexpected[:3]}...")


# ----------------------------------------------------------------------------- kohya


def kohya_state_dict(model, prefix: str = "unet") -> dict:
    """A model's LoRA in kohya / A1111 / ComfyUI keys: ``lora_unet_<module>.lora_down.weight`` (A),
    ``.lora_up.weight`` (B) and ``.alpha``, via diffusers' ``convert_state_dict_to_kohya`` (which
    wants peft keys prefixed ``unet.``, or ``prefix.``); alpha is the adapter's lora_alpha, as a
    float32 scalar."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    peft_state = {f"{prefix}.{k}": v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    state = convert_state_dict_to_kohya(peft_state)
    alpha = float(model.peft_config["default"].lora_alpha)
    return {k: (torch.tensor(alpha, dtype=torch.float32) if k.endswith(".alpha") else v.contiguous())
            for k, v in state.items()}


def unet_kohya_state_dict(unet) -> dict:
    """The UNet's ``lora_unet_*`` tensors: diffusers' block names for SD v1.5 (what A1111 and ComfyUI
    read for it), the family's kohya names where it has its own (SDXL's SGM blocks, what sd-scripts
    writes)."""
    state = kohya_state_dict(unet)
    blocks = unet_family(unet).kohya_unet_blocks(unet.config)
    if blocks is None:
        return state
    renamed = {}
    for key, value in state.items():
        name = key.removeprefix("lora_unet_")
        block = next((b for b in blocks if name.startswith(b)), None)
        if block is None:
            raise ValueError(f"no SGM name for the UNet's LoRA module {key} (only attention blocks have one)")
        renamed["lora_unet_" + blocks[block] + name[len(block):]] = value
    return renamed


def save_lora_kohya(unet, output_dir: str | os.PathLike, precision: str = "float", describe=None,
                    crash_point: str | None = None, text_encoders=()) -> Path:
    """Writes ``output_dir/pytorch_lora_weights_kohya.safetensors`` atomically, its tensors in
    ``precision``; ``describe(state)`` gives its header metadata (kohya_metadata.kohya_file_metadata),
    else only kohya's two format keys. With ``text_encoders``: their ``lora_te*`` keys too."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state = cast_state_dict(all_kohya_state_dict(unet, text_encoders), precision)
    metadata = describe(state) if describe is not None else {"format": "pt", "ss_network_module": "networks.lora"}
    from safetensors.torch import save

    return write_atomically(output_dir / KOHYA_WEIGHTS_NAME, save(state, metadata=metadata), crash_point)


def all_kohya_state_dict(unet, text_encoders=()) -> dict:
    """The kohya file's tensors: the UNet's ``lora_unet_*`` and (when they train) the text encoders' ``lora_te*_``."""
    return {**unet_kohya_state_dict(unet), **text_encoder_kohya_state_dict(unet, text_encoders)}


def export_precision_problem(unet, export_format: str, precision: str, text_encoders=()) -> str | None:
    """What keeps the LoRA from being exported in ``precision`` (a tensor beyond its range), or None.
    Both formats hold the same values (A, B, alpha), so one state dict answers for both."""
    if precision_dtype(precision) is None:  # float: saved as trained, nothing to check (or to build)
        return None
    return precision_overflow(all_kohya_state_dict(unet, text_encoders), precision)


def export_lora(unet, output_dir: str | os.PathLike, export_format: str = "diffusers", precision: str = "float",
                describe_kohya=None, text_encoders=()) -> Path:
    """The end-of-run export: ``diffusers``, ``kohya`` or ``both``, in --save_precision ``precision``
    (check export_precision_problem first), with the text encoders' LoRA in each file when given;
    returns the diffusers file when written, else the kohya one."""
    paths = []
    if export_format in ("diffusers", "both"):
        paths.append(save_lora(unet, output_dir, precision, text_encoders))
    if export_format in ("kohya", "both"):
        paths.append(save_lora_kohya(unet, output_dir, precision, describe_kohya, crash_point="kohya:mid",
                                     text_encoders=text_encoders))
    if not paths:
        raise ValueError(f"unknown export format {export_format!r}")
    return paths[0]
