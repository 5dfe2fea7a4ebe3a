"""SDXL's LoRA files and text encoders: --train_text_encoder's gradient reaches both CLIP encoders
through both UNet forwards of the SAT step (against the written-out loss); the diffusers file loads
through StableDiffusionXLPipeline.load_lora_weights to the trained modules; the kohya file (SGM UNet
names, lora_te1_/lora_te2_) gives what the diffusers file gives through diffusers' own kohya-SDXL
converter, with ComfyUI's key names; its metadata names SDXL; --save_precision covers the second
encoder; a checkpoint's LoRA loads back bit for bit (a killed SDXL run's resume: test_train_text_encoder.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from ldm_layout import unet_to_ldm
from sat_train.config.settings import TrainConfig
from sat_train.errors import UsageError
from sat_train.demo import build_sdxl_components
from sat_train.outputs.lora_files import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME, export_lora, export_precision_problem, load_lora, save_lora, save_lora_kohya
from sat_train.outputs.kohya_metadata import kohya_file_metadata
from sat_train.models.lora import add_lora, lora_parameters
from sat_train.models.family import SD15, SDXL, encode_prompt as encode_sdxl_prompt
from sat_train.models.lora import TEXT_ENCODER_LORA_TARGET_MODULES
from sat_train.outputs.checkpoints import split_hook_models
from sat_train.outputs.lora_files import check_checkpoint_text_encoder, load_text_encoder_loras
from sat_train.run.optimizers import optimizer_param_groups
from test_train_guidance import reference_sac_loss, sac_guide
from train_helpers import lora_grads, step_inputs

CAPTIONS = ["a photo portrait of a woman, face, eyes", "a man with short dark hair"]
# ComfyUI's comfy/lora.py LORA_CLIP_MAP: CLIP's projections → their kohya names
CLIP_NAMES = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
              "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
              "self_attn.out_proj": "self_attn_out_proj"}


def sdxl_components(layers_per_block: int = 1, seed: int = 0):
    """The tiny SDXL, its UNet rebuilt with ``layers_per_block`` (SDXL's own is 2) when asked."""
    components = build_sdxl_components()
    if layers_per_block != components.unet.config.layers_per_block:
        torch.manual_seed(seed)
        components.unet = UNet2DConditionModel.from_config({**components.unet.config,
                                                            "layers_per_block": layers_per_block})
    return components


def with_loras(layers_per_block: int = 1, seed: int = 0, alpha: float = 8.0):
    """The tiny SDXL with random-B LoRAs (so each changes its model's outputs) on the UNet and both encoders."""
    components = sdxl_components(layers_per_block)
    models = (components.unet, components.text_encoder, components.text_encoder_2)
    for model in models:
        model.requires_grad_(False)
    torch.manual_seed(seed)
    add_lora(components.unet, rank=4, alpha=alpha)
    components.family.add_text_encoder_loras(components, rank=4, alpha=alpha, dropout=0.0)
    with torch.no_grad():
        for model in models:
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.3)
    return components


def caption_ids(tokenizer) -> torch.Tensor:
    return tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def sdxl_conditioning(components):
    """As diffusers' train_text_to_image_lora_sdxl encodes captions: both encoders' penultimate hidden
    states concatenated, and the second encoder's pooled (projected) output."""
    first = components.text_encoder(caption_ids(components.tokenizer), output_hidden_states=True)
    second = components.text_encoder_2(caption_ids(components.tokenizer_2), output_hidden_states=True)
    return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds


def sdxl_step_inputs(components, encode=sdxl_conditioning):
    s = step_inputs(components)
    s.cond, pooled = encode(components)
    s.added_cond_kwargs = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return s


def outputs(components, s) -> dict[str, torch.Tensor]:
    """Each trained model's output: both encoders' last hidden states (every layer's LoRA shows there)
    and the UNet's prediction on fixed inputs."""
    with torch.no_grad():
        return {"text_encoder": components.text_encoder.eval()(caption_ids(components.tokenizer)).last_hidden_state,
                "text_encoder_2": components.text_encoder_2.eval()(
                    caption_ids(components.tokenizer_2)).last_hidden_state,
                "unet": components.unet.eval()(s.noisy, s.timesteps, s.cond.detach(),
                                               added_cond_kwargs=s.added_cond_kwargs).sample}


def fixed_unet_inputs(components):
    """The UNet's inputs, computed once (on the untrained encoders), so every model sees the same ones."""
    s = step_inputs(components)
    gen = torch.Generator().manual_seed(2)
    s.cond = torch.randn(2, 77, components.unet.config.cross_attention_dim, generator=gen)
    s.added_cond_kwargs = {"text_embeds": torch.randn(2, 32, generator=gen),
                           "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return s


def loaded_outputs(folder, weight_name, layers_per_block, s) -> tuple[dict, dict]:
    """A fresh tiny SDXL pipeline's outputs after diffusers' load_lora_weights of ``folder/weight_name``,
    and before."""
    fresh = sdxl_components(layers_per_block)
    pipe = StableDiffusionXLPipeline(vae=fresh.vae, text_encoder=fresh.text_encoder,
                                     text_encoder_2=fresh.text_encoder_2, tokenizer=fresh.tokenizer,
                                     tokenizer_2=fresh.tokenizer_2, unet=fresh.unet, scheduler=fresh.noise_scheduler)
    before = outputs(fresh, s)
    pipe.load_lora_weights(str(folder), weight_name=weight_name)
    return outputs(fresh, s), before


def lora_modules(model) -> set[str]:
    return {name for name, module in model.named_modules() if hasattr(module, "lora_A")}


def comfyui_names(components) -> set[str]:
    """The kohya names ComfyUI's key map (comfy/lora.py) accepts for the trained modules: the SGM UNet's
    state-dict name with "_" for ".", behind lora_unet_ (the SGM layout from tests/ldm_layout.py, written
    from the LDM modules), and lora_te1_ / lora_te2_ + text_model.encoder.layers.N.<LORA_CLIP_MAP name>."""
    unet = components.unet
    sgm = unet_to_ldm({name + ".weight": None for name in lora_modules(unet)}, unet.config)
    names = {"lora_unet_" + key.removesuffix(".weight").replace(".", "_") for key in sgm}
    for prefix, model in (("lora_te1_", components.text_encoder), ("lora_te2_", components.text_encoder_2)):
        for name in lora_modules(model):
            layer, _, projection = name.removeprefix("text_model.").removeprefix("encoder.layers.").partition(".")
            names.add(f"{prefix}text_model_encoder_layers_{layer}_{CLIP_NAMES[projection]}")
    return names


def trainer_conditioning(components):
    """The trainer's encoding (sdxl.encode_sdxl_prompt), with gradients for the text encoders' LoRA."""
    return encode_sdxl_prompt(components.text_encoder, components.text_encoder_2, caption_ids(components.tokenizer),
                              caption_ids(components.tokenizer_2), trainable=True)


def in_float64(components):
    """The models and the schedule in float64: the tiny SDXL's float32 gradients differ by ~3e-3
    (relative) between any two orders of summation (eager vs SDPA attention), in the UNet's own LoRA
    too; in float64 the guided step and the written-out one agree to ~1e-5 (the fused mass kernel
    computes in float32)."""
    for model in (components.unet, components.text_encoder, components.text_encoder_2):
        model.to(torch.float64)
    components.noise_scheduler.alphas_cumprod = components.noise_scheduler.alphas_cumprod.to(torch.float64)
    return components


def float64_step_inputs(components, encode=sdxl_conditioning):
    s = sdxl_step_inputs(components, encode)
    for name in ("x0", "noise", "noisy", "target"):
        setattr(s, name, getattr(s, name).double())
    s.added_cond_kwargs["time_ids"] = s.added_cond_kwargs["time_ids"].double()
    return s


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def test_guided_loss_gradient_reaches_both_text_encoders_as_the_written_out_loss():
    """cond carries both encoders, text_embeds the second's pooled output; both UNet forwards read them."""
    components = in_float64(with_loras())
    unet, encoders = components.unet, (components.text_encoder, components.text_encoder_2)
    s = float64_step_inputs(components)
    ref_loss, ref_mass = reference_sac_loss(components, s, ratio=0.5)
    ref_loss.backward()
    expected = [lora_grads(encoder) for encoder in encoders]
    for model in (unet, *encoders):
        model.zero_grad(set_to_none=True)
    assert (ref_mass > 1.0).any() and not (ref_mass > 1.0).all(), "needs a partial mask"

    def guided_grads(detach_degraded: bool) -> tuple[torch.Tensor, list[dict]]:
        guide = sac_guide(components, ratio=0.5, detach_degraded=detach_degraded)
        result = guide(unet, float64_step_inputs(components, trainer_conditioning))
        result.loss.backward()
        grads = [lora_grads(encoder) for encoder in encoders]
        for model in (unet, *encoders):
            model.zero_grad(set_to_none=True)
        return result.loss, grads

    loss, got = guided_grads(detach_degraded=False)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=1e-5)
    for encoder, grads, want in zip(encoders, got, expected, strict=True):
        assert grads.keys() == want.keys() and len(grads) == 2 * len(lora_modules(encoder))  # A and B each
        for name, grad in grads.items():
            assert grad.abs().max() > 0, name
            assert relative_error(grad, want[name]) < 1e-4, name
    # the check can fail: through the first forward alone, each encoder's gradient is far from it
    _, first_only = guided_grads(detach_degraded=True)
    for grads, want in zip(first_only, expected, strict=True):
        assert max(relative_error(grads[n], want[n]) for n in want) > 1e-2


def test_lora_sits_on_every_layer_sdxl_reads():
    """The first encoder's last layer is not read (penultimate hidden states): no LoRA there; the
    second's feeds the pooled embedding."""
    components = with_loras()
    for model, read in ((components.text_encoder, 1), (components.text_encoder_2, 2)):
        top = "text_model." if hasattr(model, "text_model") else ""
        assert model.config.num_hidden_layers == 2
        assert lora_modules(model) == {f"{top}encoder.layers.{i}.{block}.{name}" for i in range(read)
                                       for block, name in (p.split(".") for p in CLIP_NAMES)}
        assert {name.rpartition(".")[2] for name in lora_modules(model)} == set(TEXT_ENCODER_LORA_TARGET_MODULES)


def test_one_param_group_per_text_encoder_at_the_text_encoder_lr():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 2, 1)]
    config = TrainConfig(learning_rate=1e-3, train_text_encoder=True, text_encoder_lr=2e-4)
    groups = optimizer_param_groups(config, [params[0]], [[params[1]], [params[2]]], lr_scale=2.0)
    assert [(g["params"], g["lr"]) for g in groups] == [([params[0]], 2e-3), ([params[1]], 4e-4), ([params[2]], 4e-4)]


def test_checkpoint_hooks_tell_the_three_models_apart():
    from types import SimpleNamespace

    components = build_sdxl_components()
    models = [components.text_encoder_2, components.unet, components.text_encoder]
    accelerator = SimpleNamespace(unwrap_model=lambda model: model)
    classes = type(components.unet), type(components.text_encoder), type(components.text_encoder_2)
    assert split_hook_models(accelerator, models, classes) == [components.unet, components.text_encoder,
                                                               components.text_encoder_2]
    assert split_hook_models(accelerator, models[1:2], classes) == [components.unet, None, None]
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        split_hook_models(accelerator, models, classes[:2])


@pytest.mark.parametrize("layers_per_block", [1, 2])
def test_diffusers_and_kohya_files_load_through_diffusers_to_the_trained_modules(tmp_path, layers_per_block):
    trained = with_loras(layers_per_block)
    s = fixed_unet_inputs(trained)
    want = outputs(trained, s)
    export_lora(trained.unet, tmp_path, "both", text_encoders=trained.text_encoders)

    from_diffusers, untrained = loaded_outputs(tmp_path, LORA_WEIGHTS_NAME, layers_per_block, s)
    for name, value in want.items():
        assert (from_diffusers[name] - untrained[name]).abs().max() > 1e-3, f"{name}: the LoRA must change it"
        torch.testing.assert_close(from_diffusers[name], value, rtol=1e-5, atol=1e-5, msg=name)
    # diffusers' kohya-SDXL loader (SGM block mapping, lora_te1_/lora_te2_) gives what the diffusers file gives
    from_kohya, _ = loaded_outputs(tmp_path, KOHYA_WEIGHTS_NAME, layers_per_block, s)
    for name, value in from_diffusers.items():
        torch.testing.assert_close(from_kohya[name], value, rtol=0, atol=1e-5, msg=name)

    kohya = load_file(tmp_path / KOHYA_WEIGHTS_NAME)
    modules = {key.split(".")[0] for key in kohya}
    assert modules == comfyui_names(trained)  # every trained module, under ComfyUI's names
    assert all(kohya[f"{m}.alpha"].item() == 8.0 for m in modules)
    assert {k.rsplit(".", 2)[-2] for k in kohya if k.endswith(".weight")} == {"lora_down", "lora_up"}


def test_kohya_metadata_names_sdxl(tmp_path):
    components = with_loras()
    config = TrainConfig(output_dir=str(tmp_path / "face-xl"), resolution=1024, train_text_encoder=True,
                         text_encoder_lr=5e-5)

    def describe(state):
        return kohya_file_metadata(state, config, steps=3, epoch=1, max_train_steps=3, family=SDXL())

    path = save_lora_kohya(components.unet, tmp_path, describe=describe, text_encoders=components.text_encoders)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    # sd-scripts' strings for an SDXL LoRA (library/sdxl_model_util.py, library/sai_model_spec.py)
    assert {k: metadata[k] for k in ("ss_base_model_version", "ss_v2", "ss_resolution", "ss_text_encoder_lr",
                                     "modelspec.architecture", "modelspec.implementation",
                                     "modelspec.resolution")} == {
        "ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False", "ss_resolution": "(1024, 1024)",
        "ss_text_encoder_lr": "5e-05", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.resolution": "1024x1024"}
    sd15 = kohya_file_metadata({}, config, steps=3, epoch=1, max_train_steps=3, family=SD15())
    assert (sd15["ss_base_model_version"], sd15["modelspec.architecture"]) == ("sd_v1", "stable-diffusion-v1/lora")


def test_save_precision_covers_the_second_text_encoder(tmp_path):
    components = with_loras()
    unet, first, second = components.unet, components.text_encoder, components.text_encoder_2
    export_lora(unet, tmp_path, "both", "fp16", text_encoders=[first, second])
    for name, prefix in ((LORA_WEIGHTS_NAME, "text_encoder_2."), (KOHYA_WEIGHTS_NAME, "lora_te2_")):
        saved = {k: v for k, v in load_file(tmp_path / name).items() if k.startswith(prefix)}
        assert saved and {v.dtype for v in saved.values()} == {torch.float16}, name
    assert export_precision_problem(unet, "both", "fp16", [first, second]) is None
    with torch.no_grad():
        second.get_submodule(sorted(lora_modules(second))[0]).lora_B["default"].weight[0, 0] = 1e6
    problem = export_precision_problem(unet, "both", "fp16", [first, second])
    assert problem is not None and problem.startswith("lora_te2_") and "1e+06" in problem


def test_a_checkpoint_loads_back_bit_for_bit_into_fresh_loras(tmp_path):
    """The resume path at the function level: save_lora (float) → load_lora / load_text_encoder_loras
    into a model whose LoRA was drawn from another seed."""
    trained, fresh = with_loras(seed=0), with_loras(seed=1)
    save_lora(trained.unet, tmp_path, text_encoders=trained.text_encoders)
    check_checkpoint_text_encoder(tmp_path, True, trained.unet)
    load_lora(fresh.unet, tmp_path)
    load_text_encoder_loras(fresh.unet, fresh.text_encoders, tmp_path)
    for model in ("unet", "text_encoder", "text_encoder_2"):
        want, got = lora_parameters(getattr(trained, model)), lora_parameters(getattr(fresh, model))
        assert len(got) == len(want) > 0
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), model


def test_checkpoint_without_one_of_the_text_encoders_is_refused(tmp_path):
    components = with_loras()
    unet = components.unet
    save_lora(unet, tmp_path / "unet-only")
    save_lora(unet, tmp_path / "first-only", text_encoders=[components.text_encoder, None])
    save_lora(unet, tmp_path / "second-only", text_encoders=[None, components.text_encoder_2])
    check_checkpoint_text_encoder(tmp_path / "unet-only", False, unet)
    with pytest.raises(UsageError, match="saved without --train_text_encoder"):
        check_checkpoint_text_encoder(tmp_path / "unet-only", True, unet)
    for folder in ("first-only", "second-only"):
        with pytest.raises(UsageError, match="only one of SDXL's text encoders"):
            check_checkpoint_text_encoder(tmp_path / folder, True, unet)


@pytest.mark.parametrize("saved, resumed", [("sd15", "sdxl"), ("sdxl", "sd15"), ("sdxl", "sdxl rank 8")])
def test_a_checkpoint_of_another_model_or_rank_is_refused_in_one_line(tmp_path, saved, resumed):
    """Resuming into another family's UNet (or another --rank) would fail in torch's load_state_dict
    with a traceback, or leave LoRA modules the file lacks untouched: a UsageError before loading."""
    from sat_train.demo import build_components

    def unet_with_lora(family):
        components = build_sdxl_components() if family.startswith("sdxl") else build_components()
        add_lora(components.unet, rank=8 if family.endswith("rank 8") else 4, alpha=4.0)  # the same --lora_alpha
        return components.unet

    save_lora(unet_with_lora(saved), tmp_path)
    unet = unet_with_lora(resumed)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(UsageError, match=rf"{tmp_path} holds a LoRA that does not fit this UNet .*: resume with"):
        load_lora(unet, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())  # nothing loaded
    load_lora(unet_with_lora(saved), tmp_path)  # the model that saved it loads it


def test_prepare_models_puts_fp32_loras_on_both_text_encoders():
    from types import SimpleNamespace

    from sat_train.run.prepare import prepare_models

    config = TrainConfig(demo_model="sdxl", train_text_encoder=True, gradient_checkpointing=True, output_dir="unused")
    components, _ = prepare_models(config, SimpleNamespace(device=torch.device("cpu")), torch.bfloat16)
    assert components.family.name == "sdxl"
    for model in (components.text_encoder, components.text_encoder_2):
        dtypes = {}
        for name, param in model.named_parameters():
            dtypes.setdefault(("lora" if "lora_" in name else "frozen", param.requires_grad), set()).add(param.dtype)
        assert dtypes == {("lora", True): {torch.float32}, ("frozen", False): {torch.bfloat16}}
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert len(lora_modules(components.text_encoder)) < len(lora_modules(components.text_encoder_2))


def test_checkpoint_hooks_save_and_load_both_text_encoders(tmp_path):
    """outputs/checkpoints.py's accelerate hooks: the save hook writes one SDXL file, the load hook restores all three LoRAs."""
    from types import SimpleNamespace

    from sat_train.outputs.checkpoints import register_lora_checkpoint_hooks

    hooks = {}
    accelerator = SimpleNamespace(unwrap_model=lambda model: model, is_main_process=True,
                                  register_save_state_pre_hook=lambda hook: hooks.setdefault("save", hook),
                                  register_load_state_pre_hook=lambda hook: hooks.setdefault("load", hook))
    trained, fresh = with_loras(seed=0), with_loras(seed=1)
    register_lora_checkpoint_hooks(accelerator, trained.unet, torch.float32, trained.text_encoders)
    names = ("unet", "text_encoder", "text_encoder_2")
    weights = [None] * 3
    hooks["save"]([getattr(trained, n) for n in names], weights, str(tmp_path))
    assert weights == []  # accelerate saves nothing of the whole models
    with safe_open(str(tmp_path / LORA_WEIGHTS_NAME), "pt") as f:
        assert {key.split(".")[0] for key in f.keys()} == set(names)
    hooks["load"]([getattr(fresh, n) for n in names], str(tmp_path))
    for name in names:
        assert all(torch.equal(g, w) for g, w in zip(lora_parameters(getattr(fresh, name)),
                                                     lora_parameters(getattr(trained, name)), strict=True)), name

