"""--export_format: kohya keys, shapes and alpha, and a round trip of both files (alpha = rank and
alpha != rank) through diffusers' load_lora_weights to the trained model's UNet outputs."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file

from sat_train.demo import build_components
from sat_train.outputs.lora_files import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME, export_lora
from sat_train.models.lora import LORA_TARGET_MODULES
from sat_train import train
from train_helpers import step_inputs, tiny_config


def trained_like_unet(rank: int, alpha: float):
    components = build_components()
    components.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                           target_modules=LORA_TARGET_MODULES))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in components.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return components


def unet_out(unet, s):
    with torch.no_grad():
        return unet(s.noisy, s.timesteps, s.cond).sample


@pytest.mark.parametrize("rank, alpha", [(4, 4), (4, 8)])
def test_kohya_export_keys_shapes_alpha_and_round_trip(tmp_path, rank, alpha):
    components = trained_like_unet(rank, alpha)
    unet = components.unet
    assert export_lora(unet, tmp_path, "both") == tmp_path / LORA_WEIGHTS_NAME
    kohya = load_file(tmp_path / KOHYA_WEIGHTS_NAME)
    with safe_open(tmp_path / KOHYA_WEIGHTS_NAME, "pt") as f:
        assert f.metadata()["format"] == "pt"

    lora_modules = {name: module for name, module in unet.named_modules() if hasattr(module, "lora_A")}
    assert len(lora_modules) == 56  # 7 transformer blocks x (attn1, attn2) x (to_q, to_k, to_v, to_out.0)
    expected_keys = set()
    for name, module in lora_modules.items():
        prefix = "lora_unet_" + name.replace(".", "_")  # e.g. lora_unet_mid_block_attentions_0_..._to_out_0
        expected_keys |= {f"{prefix}.lora_down.weight", f"{prefix}.lora_up.weight", f"{prefix}.alpha"}
        down, up = module.lora_A["default"].weight, module.lora_B["default"].weight
        assert kohya[f"{prefix}.lora_down.weight"].shape == (rank, module.base_layer.in_features)
        assert kohya[f"{prefix}.lora_up.weight"].shape == (module.base_layer.out_features, rank)
        assert torch.equal(kohya[f"{prefix}.lora_down.weight"], down.detach())
        assert torch.equal(kohya[f"{prefix}.lora_up.weight"], up.detach())
        assert kohya[f"{prefix}.alpha"].shape == () and kohya[f"{prefix}.alpha"].item() == alpha
    assert set(kohya) == expected_keys

    s = step_inputs(components, size=16)
    trained = unet_out(unet, s)
    outputs = {}
    for name in (LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME):
        fresh = build_components()
        pipe = StableDiffusionPipeline(vae=fresh.vae, text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer,
                                       unet=fresh.unet, scheduler=fresh.noise_scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        base = unet_out(fresh.unet, s)
        pipe.load_lora_weights(str(tmp_path), weight_name=name)
        outputs[name] = unet_out(fresh.unet, s)
        assert (outputs[name] - base).abs().max() > 1e-3, "the loaded LoRA must change the UNet"
    torch.testing.assert_close(outputs[KOHYA_WEIGHTS_NAME], trained, rtol=1e-5, atol=1e-5)
    # the diffusers file records alpha in its adapter metadata: the scale alpha / rank survives there too
    torch.testing.assert_close(outputs[LORA_WEIGHTS_NAME], trained, rtol=1e-5, atol=1e-5)
    if alpha != rank:  # and the check above can fail: the same LoRA at alpha = rank is far from it
        at_rank = trained_like_unet(rank, rank).unet
        assert (unet_out(at_rank, s) - trained).abs().max() > 1e-3


@pytest.mark.parametrize("export_format, files", [
    ("kohya", [KOHYA_WEIGHTS_NAME]), ("both", [LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME])])
def test_training_run_writes_the_requested_formats(tmp_path, export_format, files):
    path = train(tiny_config(tmp_path, max_train_steps=1, export_format=export_format))
    assert path == tmp_path / files[0]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(files)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files
