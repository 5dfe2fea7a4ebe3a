"""Single-file community checkpoints and ``--vae``.

A community SD v1.5 model is one ``.safetensors`` (or pickled ``.ckpt``) in the original LDM layout
(``model.diffusion_model.*`` UNet, ``first_stage_model.*`` VAE, ``cond_stage_model.transformer.*``
CLIP text encoder), as A1111, ComfyUI and civitai share them. diffusers' single-file code converts
the keys; the architecture comes from a diffusers-format config folder (``config=``: the bundled SD
v1.5 configs in sat_train/assets/sd15/, or ``--single_file_config``) or from an LDM YAML (``original_config=``,
``--original_config``), so nothing is fetched from the hub. The tokenizer is SD v1.5's CLIP BPE,
built from the bundled merges (sat_train/assets/make_sd15_tokenizer.py says where they come from), unless
``--tokenizer_name`` or the config folder gives one.
"""

from __future__ import annotations

import gzip
import pickle
import re
from pathlib import Path

import torch

from ..errors import UsageError
from .words import clip_tokenizer

BUNDLED_SD15 = Path(__file__).parents[1] / "assets" / "sd15"
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
CHECKPOINT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
MODEL_MAX_LENGTH = 77  # CLIP's context length

# the TrainConfig fields that describe the base model beyond --pretrained_model_name_or_path
# (sample.py takes them as flags and from a run's train_config.json)
MODEL_FIELDS = ("original_config", "single_file_config", "tokenizer_name", "allow_pickle_checkpoint", "vae")

# LDM key prefixes of an SD v1 single file
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
CLIP_PREFIX = "cond_stage_model.transformer."
UNET_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
# a standalone VAE file: LDM keys without a prefix, or diffusers' own
VAE_CONV_IN_KEYS = ("encoder.conv_in.weight",) + tuple(p + "encoder.conv_in.weight" for p in VAE_PREFIXES)
# the config files a --single_file_config folder must hold (the tokenizer is optional)
CONFIG_FILES = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json")


def is_checkpoint_path(source: str | None) -> bool:
    """A local file, or a name ending like one: never sent to the hub as a model id."""
    if source is None:
        return False
    path = Path(source).expanduser()
    return path.is_file() or path.suffix.lower() in CHECKPOINT_SUFFIXES


# --- checks before any model loads (TrainConfig.validate)


def check_model_flags(config) -> None:
    """The single-file flags, --vae and --tokenizer_name, checked from file headers only."""
    source = config.pretrained_model_name_or_path
    single = is_checkpoint_path(source)
    for flag in ("original_config", "single_file_config"):
        if getattr(config, flag) is not None and not single:
            raise UsageError(f"--{flag} describes the architecture of a single-file checkpoint: use it with "
                             f"--pretrained_model_name_or_path FILE.safetensors (got {source or 'the demo model'})")
    if config.vae is not None and source is None:
        raise UsageError("--vae replaces the base model's VAE: give --pretrained_model_name_or_path too (the "
                         "embedded demo model has a VAE of its own size)")
    if single:
        check_checkpoint_file(Path(source).expanduser(), "--pretrained_model_name_or_path",
                              config.allow_pickle_checkpoint, vae_given=config.vae is not None)
    if config.original_config is not None:
        check_original_config(Path(config.original_config).expanduser())
    if config.single_file_config is not None:
        check_config_folder(Path(config.single_file_config).expanduser())
    if config.vae is not None:
        if not is_vae_hub_id(config.vae):
            check_vae_source(Path(config.vae).expanduser(), config.allow_pickle_checkpoint)
    if config.tokenizer_name is not None:
        tokenizer_folder(Path(config.tokenizer_name).expanduser())


def check_checkpoint_file(path: Path, flag: str, allow_pickle: bool, vae_given: bool) -> None:
    check_file_kind(path, flag, allow_pickle)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:  # a pickle's keys are only known once it is loaded
        keys, shape_of = safetensors_header(path, flag)
        check_sd15_keys(path, flag, keys, shape_of, vae_given)


def check_file_kind(path: Path, flag: str, allow_pickle: bool) -> None:
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise UsageError(f"{flag} {path} is a {suffix or 'suffix-less'} file; pass a .safetensors (or .ckpt) "
                         "checkpoint, a diffusers folder or a hub id")
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise UsageError(f"{flag} {path} is a pickle ({suffix}), and unpickling a file can run any code in it: "
                         "use a .safetensors version, or pass --allow_pickle_checkpoint if you trust its source "
                         "(it is then read with torch.load(weights_only=True) where possible)")


def safetensors_header(path: Path, flag: str):
    """The tensor names and a shape lookup from the file's header (no tensor data is read)."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
        keys = set(handle.keys())
    except Exception as err:  # safetensors raises its own error types for every malformed header
        raise unreadable(flag, path, err) from err
    return keys, lambda key: tuple(handle.get_slice(key).get_shape())


def check_sd15_keys(path: Path, flag: str, keys, shape_of, vae_given: bool) -> None:
    """Refuses what is not an SD v1 text-to-image checkpoint, naming what it is instead."""
    what = other_model_kind(keys, shape_of)
    if what is not None:
        raise UsageError(f"{flag} {path} is {what}; sat trains LoRAs for Stable Diffusion v1.x text-to-image "
                         "models: pass an SD v1.5-based checkpoint")
    if not any(k.startswith(CLIP_PREFIX) for k in keys):
        raise UsageError(f"{flag} {path} has no CLIP text encoder ({CLIP_PREFIX}* keys); pass a full SD v1.5 "
                         "checkpoint")
    if not vae_given and not any(k.startswith(VAE_PREFIXES) for k in keys):
        raise UsageError(f"{flag} {path} has no VAE ({VAE_PREFIXES[0]}* keys): give one with --vae "
                         "(a diffusers folder or a .safetensors file)")


def other_model_kind(keys, shape_of) -> str | None:
    """What a checkpoint is when it is not SD v1 (keys as in diffusers' infer_diffusers_model_type)."""
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "an SDXL checkpoint (second text encoder conditioner.embedders.1)"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "an SDXL refiner checkpoint (OpenCLIP conditioner.embedders.0.model)"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "an SD v2 checkpoint (OpenCLIP text encoder cond_stage_model.model)"
    if UNET_CONV_IN not in keys:
        return not_a_base_model(keys)
    in_channels = shape_of(UNET_CONV_IN)[1]
    if in_channels == 9:
        return "an inpainting checkpoint (9-channel UNet input)"
    if in_channels != 4:
        return f"a checkpoint whose UNet takes {in_channels} input channels (SD v1.5 takes 4)"
    return None


def not_a_base_model(keys) -> str:
    if any("lora" in k.lower() for k in keys):
        return "a LoRA, not a base model"
    if any(k in keys for k in VAE_CONV_IN_KEYS):
        return "a VAE only (pass it as --vae)"
    return f"not a Stable Diffusion checkpoint (no {UNET_CONV_IN} key)"


def check_original_config(path: Path) -> None:
    """The LDM YAML must hold the UNet and first-stage (VAE) settings diffusers maps from."""
    import yaml

    if not path.is_file():
        raise UsageError(f"--original_config {path}: no such file (give the LDM .yaml of the checkpoint, e.g. "
                         "v1-inference.yaml)")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))["model"]["params"]
        params["unet_config"]["params"], params["first_stage_config"]["params"]["ddconfig"]
    except Exception as err:  # not YAML, or YAML without the LDM model layout
        raise UsageError(f"--original_config {path} is not an LDM model config (needs model.params.unet_config "
                         f"and model.params.first_stage_config; {type(err).__name__}: {first_line(err)})") from err


def check_config_folder(path: Path) -> None:
    missing = [name for name in CONFIG_FILES if not (path / name).is_file()]
    if missing:
        raise UsageError(f"--single_file_config {path} is not a diffusers SD v1.5 config folder: missing "
                         f"{', '.join(missing)}")


def is_vae_hub_id(source: str) -> bool:
    """--vae given as a hub id (``owner/name``, e.g. madebyollin/sdxl-vae-fp16-fix, as diffusers' SDXL
    example takes it): nothing local by that name, no checkpoint suffix."""
    return (re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None and not Path(source).expanduser().exists()
            and Path(source).suffix.lower() not in CHECKPOINT_SUFFIXES)


def check_vae_source(path: Path, allow_pickle: bool) -> None:
    if path.is_dir():
        vae_folder(path)
        return
    check_file_kind(path, "--vae", allow_pickle)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        keys, _ = safetensors_header(path, "--vae")
        check_vae_keys(path, keys)


def check_vae_keys(path: Path, keys) -> None:
    if not any(k in keys for k in VAE_CONV_IN_KEYS):
        raise UsageError(f"--vae {path} holds no VAE weights (no encoder.conv_in.weight, with or without a "
                         f"{VAE_PREFIXES[0]} prefix)")


def vae_folder(path: Path) -> Path:
    """A VAE folder (config.json + weights), or a model folder with vae/ in it."""
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            return folder
    raise UsageError(f"--vae {path} is neither a diffusers VAE folder (config.json) nor a model folder with vae/")


def tokenizer_folder(path: Path) -> Path:
    """A tokenizer folder, or a model folder with tokenizer/ in it."""
    for folder in (path, path / "tokenizer"):
        if has_tokenizer(folder):
            return folder
    raise UsageError(f"--tokenizer_name {path} is neither a CLIP tokenizer folder (tokenizer.json, or vocab.json "
                     "and merges.txt) nor a model folder with tokenizer/")


def has_tokenizer(folder: Path) -> bool:
    """transformers 5 saves tokenizer.json; older saves (and the hub's SD v1.5) have vocab.json + merges.txt."""
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file()
                                                     and (folder / "merges.txt").is_file())


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --- reading a checkpoint


def read_checkpoint(path: Path, flag: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The state dict of a .safetensors or (allowed) pickled checkpoint, unwrapped from "state_dict"."""
    check_file_kind(path, flag, allow_pickle)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        state = read_safetensors(path, flag)
    else:
        state = read_pickle(path, flag)
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning checkpoints keep the weights one level down
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise UsageError(f"{flag} {path} holds no tensors: not a model checkpoint")
    return tensors


def read_safetensors(path: Path, flag: str) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # header or data malformed / cut short
        raise unreadable(flag, path, err) from err


def read_pickle(path: Path, flag: str):
    """weights_only=True first (tensors and plain containers only); the full unpickler only when the file
    needs it, which --allow_pickle_checkpoint has allowed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise unreadable(flag, path, err) from err
        print(f"sat-train: {path.name} holds more than tensors; unpickling it fully (--allow_pickle_checkpoint)")
    except Exception as err:  # truncated zip, random bytes, ...
        raise unreadable(flag, path, err) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise unreadable(flag, path, err) from err


def unreadable(flag: str, path: Path, err: Exception) -> UsageError:
    kind = "readable .safetensors checkpoint" if path.suffix.lower() in SAFETENSORS_SUFFIXES else "readable checkpoint"
    return UsageError(f"{flag} {path} is not a {kind} ({first_line(err)}): a truncated download or another kind "
                      "of file; download it again")


def with_text_model_prefix(state: dict) -> dict:
    """Some checkpoints save the CLIP text encoder without transformers' "text_model." level; diffusers'
    converter expects it."""
    bare = [k for k in state if k.startswith(CLIP_PREFIX) and not k.startswith(CLIP_PREFIX + "text_model.")]
    for key in bare:
        state[CLIP_PREFIX + "text_model." + key[len(CLIP_PREFIX):]] = state.pop(key)
    return state


# --- building the components


def load_single_file_components(config):
    """Components of an SD v1 single file: UNet, VAE (or --vae), text encoder, tokenizer, scheduler."""
    from diffusers import DDPMScheduler

    from .components import Components

    path = Path(config.pretrained_model_name_or_path).expanduser()
    flag = "--pretrained_model_name_or_path"
    state = read_checkpoint(path, flag, config.allow_pickle_checkpoint)
    check_sd15_keys(path, flag, set(state), lambda key: tuple(state[key].shape), vae_given=config.vae is not None)
    state = with_text_model_prefix(state)
    folder = config_folder(config)
    components = Components(
        tokenizer=load_tokenizer(config),
        text_encoder=load_text_encoder(state, folder, path),
        vae=load_vae(config) if config.vae is not None else vae_from_state(state, config, path),
        unet=unet_from_state(state, config, path),
        noise_scheduler=DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler", local_files_only=True),
    )
    check_tokenizer_fits(components)
    return components


def check_tokenizer_fits(components) -> None:
    """Token ids past the text encoder's embedding table would fail at the first step, far from the cause."""
    size, table = len(components.tokenizer), components.text_encoder.config.vocab_size
    if size > table:
        raise UsageError(f"the tokenizer has {size} tokens but the text encoder's embedding only {table}: give the "
                         "model's own tokenizer with --tokenizer_name (or a tokenizer/ in --single_file_config)")


def config_folder(config) -> Path:
    return Path(config.single_file_config).expanduser() if config.single_file_config else BUNDLED_SD15


def architecture(config, subfolder: str) -> dict:
    """from_single_file's architecture arguments: the LDM YAML when given, else the config folder's."""
    if getattr(config, "original_config", None):
        return {"original_config": str(Path(config.original_config).expanduser())}
    return {"config": str(config_folder(config)), "subfolder": subfolder}


def unet_from_state(state: dict, config, path: Path):
    from diffusers import UNet2DConditionModel

    return from_state(UNet2DConditionModel, state, architecture(config, "unet"), "UNet", path)


def vae_from_state(state: dict, config, path: Path):
    from diffusers import AutoencoderKL

    return from_state(AutoencoderKL, state, architecture(config, "vae"), "VAE", path)


def from_state(cls, state: dict, arch: dict, what: str, path: Path):
    """diffusers' from_single_file on an already-read state dict; every weight must come from the file."""
    try:
        model = cls.from_single_file(state, local_files_only=True, **arch)
    except Exception as err:  # shape mismatches, missing blocks: the file and the architecture disagree
        raise architecture_error(what, path, arch, err) from err
    check_all_loaded(model, what, path, arch)
    return model


def architecture_error(what: str, path: Path, arch: dict, err: Exception) -> UsageError:
    """One line: the first weight whose shape differs (diffusers' message names it), and which config to fix."""
    mismatch = re.search(r"(\S+) expected shape torch\.Size\((\[[^\]]*\])\), but got torch\.Size\((\[[^\]]*\])\)",
                         str(err))
    if mismatch:
        detail = f"{mismatch[1]} is {mismatch[3]} in the file but {mismatch[2]} in {architecture_source(arch)}"
    else:
        detail = f"{type(err).__name__}: {first_line(err).split('. If you want')[0]}"
    return UsageError(f"cannot build the {what} of {path}: {detail}; {architecture_hint(arch)}")


def architecture_source(arch: dict) -> str:
    if "original_config" in arch:
        return f"--original_config {arch['original_config']}"
    if Path(arch["config"]) == BUNDLED_SD15:
        return "the bundled SD v1.5 config"
    return f"the {arch['subfolder']}/ config in {arch['config']}"  # --single_file_config, or a --vae's base


def architecture_hint(arch: dict) -> str:
    if "config" in arch and Path(arch["config"]) == BUNDLED_SD15:
        return ("the bundled config is SD v1.5's: is the file an SD v1.5 checkpoint? (for other sizes give "
                "--original_config or --single_file_config)")
    return f"does {architecture_source(arch)} describe this checkpoint?"


def check_all_loaded(model: torch.nn.Module, what: str, path: Path, arch: dict) -> None:
    """from_single_file leaves weights the file lacks on the meta device; say so now, not at the first step."""
    missing = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if missing:
        raise UsageError(f"{path} lacks {len(missing)} {what} weight(s) (e.g. {missing[0]}); "
                         f"{architecture_hint(arch)}")


def load_text_encoder(state: dict, folder: Path, path: Path):
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    arch = {"config": str(folder), "subfolder": "text_encoder"}
    try:
        model = create_diffusers_clip_model_from_ldm(CLIPTextModel, state, subfolder="text_encoder",
                                                     config=str(folder), local_files_only=True)
    except Exception as err:  # e.g. a text encoder of another width than the config's
        raise architecture_error("text encoder", path, arch, err) from err
    check_all_loaded(model, "text encoder", path, arch)
    return model


def load_vae(config):
    """--vae: a diffusers folder, or a single file (LDM or diffusers keys) in the base model's VAE architecture."""
    from diffusers import AutoencoderKL

    path = Path(config.vae).expanduser()
    if is_vae_hub_id(config.vae):
        try:
            return AutoencoderKL.from_pretrained(config.vae, cache_dir=config.cache_dir)
        except (OSError, ValueError) as err:
            raise UsageError(f"--vae {config.vae}: cannot load it from the hub: {first_line(err)} (give a hub id of "
                             "a diffusers VAE, a folder or a .safetensors file)") from err
    if path.is_dir():
        return AutoencoderKL.from_pretrained(str(vae_folder(path)))
    state = read_checkpoint(path, "--vae", config.allow_pickle_checkpoint)
    check_vae_keys(path, state)
    return from_state(AutoencoderKL, state, base_vae_architecture(config), "VAE", path)


def base_vae_architecture(config) -> dict:
    """The architecture a --vae single file is read in: the base model's VAE config."""
    source = config.pretrained_model_name_or_path
    if is_checkpoint_path(source):
        return architecture(config, "vae")
    return {"config": source, "subfolder": "vae"}  # a diffusers folder (or a hub id already in the cache)


def load_tokenizer(config):
    """--tokenizer_name, else the config folder's tokenizer/, else SD v1.5's from the bundled merges."""
    from transformers import CLIPTokenizer

    if config.tokenizer_name is not None:
        return CLIPTokenizer.from_pretrained(str(tokenizer_folder(Path(config.tokenizer_name).expanduser())))
    own = config_folder(config) / "tokenizer"
    if config.single_file_config and has_tokenizer(own):
        return CLIPTokenizer.from_pretrained(str(own))
    return bundled_tokenizer()


def bundled_tokenizer():
    """SD v1.5's tokenizer (openai/clip-vit-large-patch14's): vocabulary built from the merges as OpenAI's
    CLIP SimpleTokenizer builds it: the 256 byte symbols, the same with "</w>", one entry per merge, then
    <|startoftext|> and <|endoftext|> (49408 entries)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    text = gzip.decompress((BUNDLED_SD15 / "tokenizer" / "merges.txt.gz").read_bytes()).decode("utf-8")
    merges = [tuple(line.split()) for line in text.splitlines()[1:] if line]  # line 0: "#version: 0.2"
    byte_symbols = list(bytes_to_unicode().values())
    symbols = [*byte_symbols, *(s + "</w>" for s in byte_symbols), *("".join(m) for m in merges),
               "<|startoftext|>", "<|endoftext|>"]
    return clip_tokenizer({s: i for i, s in enumerate(symbols)}, merges, model_max_length=MODEL_MAX_LENGTH)
