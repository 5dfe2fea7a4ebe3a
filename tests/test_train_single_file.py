"""Single-file (LDM-layout) checkpoints, --original_config, --vae and the bundled SD v1.5 tokenizer.

The single files are written here from tiny diffusers models through tests/ldm_layout.py (the
inverse of diffusers' key conversion, proven by the round trip below); the loaded models are
compared with the same models loaded from their diffusers folder. Loading runs with the hub
switched off and sockets refused, so nothing can come from the network.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import regex
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (CHECKPOINT_KEY_NAMES, convert_ldm_clip_checkpoint,
                                                 convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                 create_unet_diffusers_config_from_ldm,
                                                 create_vae_diffusers_config_from_ldm)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_layout import sd15_single_file, unet_to_ldm, vae_to_ldm
from sat_train import sample
from sat_train.cli import main, parse_config
from sat_train.config.settings import TrainConfig
from sat_train.errors import UsageError
from sat_train.demo import build_components, save_components
from sat_train.models.load import load_components
from sat_train.models.single_file import BUNDLED_SD15, bundled_tokenizer
from train_helpers import DEMO_DATA_DIR, LORA_FILE, run_cli


@pytest.fixture
def offline(monkeypatch):
    """The hub is off (as HF_HUB_OFFLINE=1 sets it) and any network connection fails."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("network access while loading a single file")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def config_only_copy(folder: Path, target: Path) -> Path:
    """A diffusers folder's config and tokenizer files without its weights: any weight the loader
    returns must then come from the single file."""
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".txt"):
            (target / path.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target / path.relative_to(folder))
    return target


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The demo model as a diffusers folder, a configs-only folder and an LDM single file."""
    root = tmp_path_factory.mktemp("single-file")
    components = build_components(seed=3)
    folder = save_components(components, root / "tiny-sd")
    configs = config_only_copy(folder, root / "tiny-configs")
    state = sd15_single_file(components)
    save_file(state, root / "tiny.safetensors")
    return {"root": root, "folder": folder, "configs": configs, "file": root / "tiny.safetensors", "state": state,
            "unet_state": components.unet.state_dict()}


def reference_models(folder: Path):
    return (UNet2DConditionModel.from_pretrained(folder / "unet"), AutoencoderKL.from_pretrained(folder / "vae"),
            CLIPTextModel.from_pretrained(folder / "text_encoder"))


@torch.no_grad()
def unet_output(unet, hidden: int):
    gen = torch.Generator().manual_seed(0)
    sample, cond = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 5, hidden, generator=gen)
    return unet(sample, torch.tensor([500]), cond).sample


@torch.no_grad()
def vae_output(vae):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = vae.encode(image).latent_dist.mean
    return latents, vae.decode(latents).sample


@torch.no_grad()
def text_output(text_encoder):
    return text_encoder(torch.tensor([[0, 5, 9, 3, 1]])).last_hidden_state


def assert_same_weights(model, expected):
    got, want = model.state_dict(), expected.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def assert_same_outputs(got, unet, vae, text_encoder):
    """Equal weights, and equal outputs up to float rounding (the two loaders may pick different
    attention kernels)."""
    for model, expected in ((got.unet, unet), (got.vae, vae), (got.text_encoder, text_encoder)):
        assert_same_weights(model, expected)
    hidden = text_encoder.config.hidden_size
    torch.testing.assert_close(unet_output(got.unet, hidden), unet_output(unet, hidden), rtol=1e-5, atol=1e-5)
    for a, b in zip(vae_output(got.vae), vae_output(vae)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_output(got.text_encoder), text_output(text_encoder), rtol=1e-5, atol=1e-5)


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sat-train: error:"), err
    return err


def load_instead_of_training(monkeypatch) -> None:
    """cli.main then stops after the models load (errors from loading show as they would in a run)."""
    import importlib

    monkeypatch.setattr(importlib.import_module("sat_train.run.loop"), "train", load_components)


def never_train(monkeypatch) -> None:
    """A check that is not made before training starts shows as exit 1 (AssertionError), not 2."""
    import importlib

    def fail(config):
        raise AssertionError("the run started: the file was not checked before loading")

    monkeypatch.setattr(importlib.import_module("sat_train.run.loop"), "train", fail)


def data_flags(tmp_path) -> list[str]:
    return ["--train_data_dir", str(DEMO_DATA_DIR), "--output_dir", str(tmp_path / "out"), "--report_to", "none"]


# --- the LDM layout the tests write


def test_ldm_layout_is_the_inverse_of_diffusers_conversion(tiny):
    """diffusers' own converters turn the written file back into the exact state dicts."""
    components = build_components(seed=3)
    state = tiny["state"]
    for got, model in ((convert_ldm_unet_checkpoint(state, dict(components.unet.config)), components.unet),
                       (convert_ldm_vae_checkpoint(state, dict(components.vae.config)), components.vae)):
        expected = model.state_dict()
        assert set(got) == set(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    text = components.text_encoder.state_dict()
    got = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()}
    assert all(torch.equal(got[k], text[k]) for k in text)


def test_ldm_layout_of_full_size_sd15_has_the_original_key_names():
    """For SD v1.5's own sizes the layout gives the key names diffusers recognises SD v1 files by."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(BUNDLED_SD15 / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(BUNDLED_SD15 / "vae"))
    unet_keys = {"model.diffusion_model." + k for k in unet_to_ldm(unet.state_dict(), unet.config)}
    for name in ("v1", "v2", "inpainting"):  # output_blocks.11.0.skip_connection, input_blocks.2.1...attn2
        assert CHECKPOINT_KEY_NAMES[name] in unet_keys
    assert len(unet_keys) == len(unet.state_dict())
    vae_keys = set(vae_to_ldm(vae.state_dict(), vae.config))
    assert {"decoder.up.3.block.2.conv2.weight", "encoder.down.3.block.1.norm1.weight",
            "encoder.mid.attn_1.proj_out.weight", "decoder.up.0.block.0.nin_shortcut.weight"} <= vae_keys


# --- the bundled SD v1.5 configs and tokenizer

V1_INFERENCE_YAML = """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [4, 2, 1]
        num_res_blocks: 2
        channel_mult: [1, 2, 4, 4]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""


def test_bundled_configs_match_sd15_original_yaml():
    """The bundled UNet/VAE configs equal what diffusers derives from SD v1.5's v1-inference.yaml
    (CompVis/stable-diffusion configs/stable-diffusion/v1-inference.yaml); the scheduler has its betas."""
    import yaml

    original = yaml.safe_load(V1_INFERENCE_YAML)
    fake_v1 = {CHECKPOINT_KEY_NAMES["v1"]: torch.zeros(1)}
    for derive, name in ((create_unet_diffusers_config_from_ldm, "unet"), (create_vae_diffusers_config_from_ldm, "vae")):
        derived = derive(original, fake_v1)
        bundled = json.loads((BUNDLED_SD15 / name / "config.json").read_text())
        for key, value in derived.items():
            if value is not None and key != "transformer_layers_per_block":
                assert bundled.get(key, value) == (list(value) if isinstance(value, tuple) else value), key
    scheduler = json.loads((BUNDLED_SD15 / "scheduler" / "scheduler_config.json").read_text())
    params = original["model"]["params"]
    assert (scheduler["beta_start"], scheduler["beta_end"]) == (params["linear_start"], params["linear_end"])


def openai_clip_encode(text: str) -> list[int]:
    """OpenAI CLIP's SimpleTokenizer (clip/simple_tokenizer.py), written out: byte-to-unicode table, BPE
    by merge rank, vocabulary = bytes, bytes + </w>, merges, the two special tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = dict(zip(printable, printable)), 0
    for byte in range(256):
        if byte not in table:
            table[byte], extra = 256 + extra, extra + 1
    byte_encoder = {b: chr(c) for b, c in table.items()}
    lines = gzip.decompress((BUNDLED_SD15 / "tokenizer" / "merges.txt.gz").read_bytes()).decode().split("\n")
    merges = [tuple(line.split()) for line in lines[1:] if line]
    symbols = list(byte_encoder.values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    encoder = {s: i for i, s in enumerate(vocab + ["<|startoftext|>", "<|endoftext|>"])}
    ranks = {m: i for i, m in enumerate(merges)}
    pattern = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                            r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    ids = [encoder["<|startoftext|>"]]
    for token in pattern.findall(" ".join(text.split()).lower()):
        word = [*("".join(byte_encoder[b] for b in token.encode("utf-8")))]
        word[-1] += "</w>"
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(encoder[piece] for piece in word)
    return ids + [encoder["<|endoftext|>"]]


@pytest.mark.parametrize("text", [
    "a photo of a cat", "A close-up portrait of a woman, face, eyes, short brown hair",
    "masterpiece, best quality, 1girl, looking at viewer!!", "Jekyll's   café  isn't 42 stars; ÿ ¼",
])
def test_bundled_tokenizer_matches_openai_clip(text):
    tokenizer = bundled_tokenizer()
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert tokenizer(text).input_ids == openai_clip_encode(text)
    padded = tokenizer(text, padding="max_length", max_length=77).input_ids
    assert padded[len(openai_clip_encode(text)):] == [tokenizer.convert_tokens_to_ids("<|endoftext|>")] * (
        77 - len(openai_clip_encode(text)))


# --- loading a single file


@pytest.mark.parametrize("clip_keys", ["text_model.", "without text_model."])
def test_single_file_loads_like_its_diffusers_folder(tiny, tmp_path, offline, clip_keys):
    """Also the older layout some files have, CLIP keys without transformers' text_model. level."""
    path = tiny["file"]
    if clip_keys != "text_model.":
        path = tmp_path / "bare-clip.safetensors"
        save_file({k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
                   for k, v in tiny["state"].items()}, path)
    config = parse_config(["--pretrained_model_name_or_path", str(path),
                           "--single_file_config", str(tiny["configs"]), *data_flags(tiny["root"])])
    got = load_components(config)
    assert_same_outputs(got, *reference_models(tiny["folder"]))
    assert got.tokenizer("a photo of a woman").input_ids == build_components().tokenizer(
        "a photo of a woman").input_ids
    assert got.noise_scheduler.config.beta_schedule == "scaled_linear"


def test_fp16_file_loads_as_float32(tiny, tmp_path, offline):
    """Community files are mostly fp16 ("pruned"); training needs float32 weights (as from a folder)."""
    half = tmp_path / "half.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tiny["state"].items()}, half)
    got = load_components(parse_config(["--pretrained_model_name_or_path", str(half), "--single_file_config",
                                        str(tiny["configs"]), *data_flags(tmp_path)]))
    unet = reference_models(tiny["folder"])[0]
    assert {got.unet.dtype, got.vae.dtype, got.text_encoder.dtype} == {torch.float32}
    expected = {k: v.half().float() for k, v in unet.state_dict().items()}
    assert all(torch.equal(v, expected[k]) for k, v in got.unet.state_dict().items())


def test_tokenizer_name_and_a_tokenizer_too_big_for_the_text_encoder(tiny, tmp_path, capsys, monkeypatch, offline):
    """A config folder without tokenizer/ means SD v1.5's bundled tokenizer, whose 49408 ids do not fit the
    tiny text encoder: one line at load time; --tokenizer_name (a model folder) gives the right one."""
    configs = shutil.copytree(tiny["configs"], tmp_path / "configs", ignore=shutil.ignore_patterns("tokenizer"))
    argv = ["--pretrained_model_name_or_path", str(tiny["file"]), "--single_file_config", str(configs),
            *data_flags(tmp_path)]
    load_instead_of_training(monkeypatch)
    err = one_line_error(capsys, argv)
    assert "49408 tokens" in err and "--tokenizer_name" in err
    got = load_components(parse_config([*argv, "--tokenizer_name", str(tiny["folder"])]))
    prompt = "a close-up photo of a smiling woman, brown hair"
    assert got.tokenizer(prompt).input_ids == build_components().tokenizer(prompt).input_ids
    assert len(got.tokenizer) == got.text_encoder.config.vocab_size


@pytest.mark.skipif(os.environ.get("SAT_FULL_SIZE_TESTS") != "1",
                    reason="full-size SD v1.5 (~13 GB of RAM, minutes): set SAT_FULL_SIZE_TESTS=1")
def test_full_size_sd15_file_loads_with_the_bundled_configs(tmp_path, offline):
    """The real case: an SD v1.5-sized file (random weights) through the bundled configs and tokenizer."""
    torch.manual_seed(0)
    models = SimpleNamespace(
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(BUNDLED_SD15 / "unet")),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(BUNDLED_SD15 / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(BUNDLED_SD15 / "text_encoder")))
    save_file(sd15_single_file(models), tmp_path / "sd15.safetensors")
    got = load_components(parse_config(["--pretrained_model_name_or_path", str(tmp_path / "sd15.safetensors"),
                                        *data_flags(tmp_path)]))
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(got, name), getattr(models, name))
    assert got.tokenizer("a photo of a cat").input_ids == openai_clip_encode("a photo of a cat")


def tiny_ldm_models():
    """A UNet and VAE that LDM's YAML can describe (LDM's GroupNorm has 32 groups)."""
    torch.manual_seed(5)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1)
    return unet, vae


TINY_LDM_YAML = """
model:
  params:
    scale_factor: 0.18215
    unet_config:
      params: {in_channels: 4, out_channels: 4, model_channels: 32, attention_resolutions: [1], num_res_blocks: 1,
               channel_mult: [1, 2], num_heads: 2, transformer_depth: 1, context_dim: 32}
    first_stage_config:
      params:
        ddconfig: {double_z: true, z_channels: 4, resolution: 64, in_channels: 3, out_ch: 3, ch: 32,
                   ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: []}
"""


def test_original_config_yaml_gives_the_architecture(tiny, tmp_path, offline):
    """--original_config: UNet and VAE sizes from an LDM YAML; text encoder, tokenizer, scheduler from
    --single_file_config."""
    components = build_components(seed=3)
    components.unet, components.vae = tiny_ldm_models()
    save_file(sd15_single_file(components), tmp_path / "ldm.safetensors")
    (tmp_path / "tiny.yaml").write_text(TINY_LDM_YAML)
    config = parse_config(["--pretrained_model_name_or_path", str(tmp_path / "ldm.safetensors"),
                           "--original_config", str(tmp_path / "tiny.yaml"),
                           "--single_file_config", str(tiny["configs"]), *data_flags(tmp_path)])
    got = load_components(config)
    assert_same_outputs(got, components.unet, components.vae, components.text_encoder)
    # without the YAML, the demo's configs describe other sizes: the error names the weight and the folder
    mismatched = parse_config(["--pretrained_model_name_or_path", str(tmp_path / "ldm.safetensors"),
                               "--single_file_config", str(tiny["configs"]), *data_flags(tmp_path)])
    with pytest.raises(UsageError, match=r"is \[32, 3, 3, 3\] in the file but \[8, 3, 3, 3\] in the vae/ config in"):
        load_components(mismatched)


def test_bundled_config_describes_a_different_model_in_one_line(tiny, tmp_path, capsys, monkeypatch):
    """Without --single_file_config the tiny file meets SD v1.5's full-size config: a clear error."""
    load_instead_of_training(monkeypatch)
    err = one_line_error(capsys, ["--pretrained_model_name_or_path", str(tiny["file"]), *data_flags(tmp_path)])
    assert str(tiny["file"]) in err and "in the file but" in err and "is the file an SD v1.5 checkpoint" in err


def test_training_run_from_a_single_file(tiny, tmp_path):
    proc = run_cli("--pretrained_model_name_or_path", str(tiny["file"]), "--single_file_config", str(tiny["configs"]),
                   "--train_data_dir", str(DEMO_DATA_DIR), "--resolution", "64", "--train_batch_size", "2",
                   "--max_train_steps", "1", "--lr_warmup_steps", "0", "--guide", "sac", "--report_to", "none",
                   "--output_dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / LORA_FILE).is_file()
    recorded = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert recorded["pretrained_model_name_or_path"] == str(tiny["file"])
    # the sampling CLI loads the same file as its base, with the run's --single_file_config
    args = sample.build_parser().parse_args(["--lora", str(tmp_path / "out"), "--prompt", "a photo"])
    components, source = sample.load_pipeline_components(args, torch.device("cpu"))
    assert source == str(tiny["file"])
    base = {k.replace(".base_layer", ""): v for k, v in components.unet.state_dict().items() if "lora_" not in k}
    assert base.keys() == tiny["unet_state"].keys()
    assert all(torch.equal(base[k], v) for k, v in tiny["unet_state"].items())


# --- pickles


def test_ckpt_refused_without_the_flag_and_loaded_with_it(tiny, tmp_path, capsys, monkeypatch, offline):
    never_train(monkeypatch)
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": tiny["state"], "global_step": 7, "epoch": 1}, ckpt)  # Lightning's nesting
    argv = ["--pretrained_model_name_or_path", str(ckpt), "--single_file_config", str(tiny["configs"]),
            *data_flags(tmp_path)]
    err = one_line_error(capsys, argv)
    assert "pickle" in err and "--allow_pickle_checkpoint" in err and str(ckpt) in err
    got = load_components(parse_config([*argv, "--allow_pickle_checkpoint"]))
    assert_same_outputs(got, *reference_models(tiny["folder"]))


class NotATensor:  # a global that torch.load(weights_only=True) refuses to unpickle
    pass


def test_ckpt_with_other_objects_is_unpickled_only_with_the_flag(tiny, tmp_path, capsys):
    ckpt = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": tiny["state"], "callbacks": NotATensor()}, ckpt)
    config = parse_config(["--pretrained_model_name_or_path", str(ckpt), "--single_file_config",
                           str(tiny["configs"]), "--allow_pickle_checkpoint", *data_flags(tmp_path)])
    got = load_components(config)
    assert "unpickling it fully" in capsys.readouterr().out
    assert_same_outputs(got, *reference_models(tiny["folder"]))


# --- what is not an SD v1.5 checkpoint


def fake_checkpoint(path: Path, shapes: dict) -> Path:
    save_file({k: torch.zeros(shape) for k, shape in shapes.items()}, path)
    return path


SD1_TEXT = {"cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 8)}
SD1_VAE = {"first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3)}


@pytest.mark.parametrize("kind, shapes, expected", [
    ("sdxl", {"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3), **SD1_VAE,
              "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
              "conditioner.embedders.1.model.positional_embedding": (77, 8)}, "an SDXL checkpoint"),
    ("sd2", {"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3), **SD1_VAE,
             "cond_stage_model.model.token_embedding.weight": (10, 8)}, "an SD v2 checkpoint"),
    ("inpainting", {"model.diffusion_model.input_blocks.0.0.weight": (8, 9, 3, 3), **SD1_VAE, **SD1_TEXT},
     "an inpainting checkpoint (9-channel UNet input)"),
    ("lora", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8)}, "a LoRA, not a base model"),
    ("vae only", {"encoder.conv_in.weight": (8, 3, 3, 3)}, "a VAE only (pass it as --vae)"),
    ("no text encoder", {"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3), **SD1_VAE},
     "has no CLIP text encoder"),
])
def test_other_checkpoints_are_refused_by_name(tmp_path, capsys, monkeypatch, kind, shapes, expected):
    never_train(monkeypatch)
    path = fake_checkpoint(tmp_path / f"{kind}.safetensors", shapes)
    err = one_line_error(capsys, ["--pretrained_model_name_or_path", str(path), *data_flags(tmp_path)])
    assert expected in err and str(path) in err


@pytest.mark.parametrize("case", ["truncated", "random bytes", "json", "empty"])
def test_unreadable_files_give_one_line(tiny, tmp_path, capsys, monkeypatch, case):
    never_train(monkeypatch)
    if case == "truncated":
        path = tmp_path / "cut.safetensors"
        path.write_bytes(tiny["file"].read_bytes()[: tiny["file"].stat().st_size // 2])
    elif case == "random bytes":
        path = tmp_path / "noise.safetensors"
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    elif case == "json":
        path = tmp_path / "model_index.json"
        path.write_text('{"_class_name": "StableDiffusionPipeline"}')
    else:
        path = tmp_path / "empty.safetensors"
        path.write_bytes(b"")
    err = one_line_error(capsys, ["--pretrained_model_name_or_path", str(path), *data_flags(tmp_path)])
    assert str(path) in err


def test_truncated_ckpt_gives_one_line(tiny, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": tiny["state"]}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:100_000])
    load_instead_of_training(monkeypatch)
    err = one_line_error(capsys, ["--pretrained_model_name_or_path", str(ckpt), "--allow_pickle_checkpoint",
                                  "--single_file_config", str(tiny["configs"]), *data_flags(tmp_path)])
    assert "not a readable checkpoint" in err


def test_single_file_flags_need_a_single_file(tiny, tmp_path, capsys):
    err = one_line_error(capsys, ["--pretrained_model_name_or_path", str(tiny["folder"]), "--original_config",
                                  str(tmp_path / "x.yaml"), *data_flags(tmp_path)])
    assert "--original_config" in err and "single-file" in err
    err = one_line_error(capsys, ["--vae", str(tiny["folder"]), "--output_dir", str(tmp_path)])
    assert "--vae" in err and "--pretrained_model_name_or_path" in err
    with pytest.raises(UsageError, match="no such file"):
        TrainConfig(pretrained_model_name_or_path=str(tmp_path / "missing.safetensors")).validate()


# --- --vae


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory):
    """A second VAE (other weights) as a diffusers folder, an LDM file without prefix (as standalone VAE
    releases ship) and a diffusers-layout file."""
    root = tmp_path_factory.mktemp("vae")
    vae = build_components(seed=11).vae
    vae.save_pretrained(root / "folder")
    save_file({k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()},
              root / "ldm-vae.safetensors")
    shutil.copy(root / "folder" / "diffusion_pytorch_model.safetensors", root / "diffusers-vae.safetensors")
    return root


@pytest.mark.parametrize("base, vae_name", [
    ("file", "folder"), ("file", "ldm-vae.safetensors"), ("file", "diffusers-vae.safetensors"),
    ("folder", "ldm-vae.safetensors"), ("folder", "folder"),
])
def test_vae_replaces_the_base_models_vae(tiny, other_vae, tmp_path, base, vae_name, offline):
    base_flags = (["--pretrained_model_name_or_path", str(tiny["file"]), "--single_file_config", str(tiny["configs"])]
                  if base == "file" else ["--pretrained_model_name_or_path", str(tiny["folder"])])
    flag = "--vae" if vae_name != "folder" else "--pretrained_vae_model_name_or_path"  # diffusers' alias
    config = parse_config([*base_flags, flag, str(other_vae / vae_name), *data_flags(tmp_path)])
    got = load_components(config)
    expected = AutoencoderKL.from_pretrained(other_vae / "folder")
    assert_same_weights(got.vae, expected)
    for a, b in zip(vae_output(got.vae), vae_output(expected)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    unet, base_vae, _ = reference_models(tiny["folder"])
    assert_same_weights(got.unet, unet)
    assert not torch.allclose(vae_output(got.vae)[0], vae_output(base_vae)[0])  # the VAE was really replaced


def test_vae_file_without_vae_weights_is_refused(tiny, tmp_path, capsys, monkeypatch):
    never_train(monkeypatch)
    lora = fake_checkpoint(tmp_path / "lora.safetensors", {"lora_unet_x.lora_down.weight": (4, 8)})
    err = one_line_error(capsys, ["--pretrained_model_name_or_path", str(tiny["folder"]), "--vae", str(lora),
                                  *data_flags(tmp_path)])
    assert "--vae" in err and "no VAE weights" in err


def test_kohya_metadata_names_the_single_file_and_the_vae(tiny, other_vae, tmp_path):
    """As sd-scripts: ss_sd_model_name / ss_vae_name are a local file's name, a hub id as given."""
    from sat_train.models.family import SD15
    from sat_train.outputs.kohya_metadata import kohya_training_metadata

    config = TrainConfig(pretrained_model_name_or_path=str(tiny["file"]), vae=str(other_vae / "ldm-vae.safetensors"),
                         output_dir=str(tmp_path))
    metadata = kohya_training_metadata(config, steps=1, epoch=1, max_train_steps=1, family=SD15())
    assert (metadata["ss_sd_model_name"], metadata["ss_vae_name"]) == ("tiny.safetensors", "ldm-vae.safetensors")
    hub = TrainConfig(pretrained_model_name_or_path="someone/sd15", vae="stabilityai/sd-vae-ft-mse")
    assert kohya_training_metadata(hub, 1, 1, 1, SD15())["ss_vae_name"] == "stabilityai/sd-vae-ft-mse"
    assert "ss_vae_name" not in kohya_training_metadata(TrainConfig(pretrained_model_name_or_path="x"), 1, 1, 1, SD15())
