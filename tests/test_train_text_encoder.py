"""--train_text_encoder: the LoRA sits on CLIP's attention and MLP projections; the guided loss's
text-encoder gradient equals the written-out loss's; two param groups at the two lrs, both scaled and
scheduled; a run trains the LoRAs and nothing else; both exported files load through diffusers'
load_lora_weights to the trained text encoder and UNet; a SIGKILLed run resumes bit-identically."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

import sat_train.run.loop as loop_module
from sat_train.cli import main
from sat_train.config.settings import TrainConfig
from sat_train.errors import UsageError
from sat_train.demo import build_components
from sat_train.outputs.lora_files import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME, save_lora
from sat_train.guide.guidance import build_guide
from sat_train.models.lora import lora_parameters
from sat_train.models.lora import add_text_encoder_lora, enable_text_encoder_checkpointing
from sat_train.models.family import SD15
from sat_train.outputs.lora_files import check_checkpoint_text_encoder
from sat_train import train
from sat_train.run.optimizers import make_lr_scheduler, make_scaled_optimizer
from test_train_crash import run as run_crashable
from test_train_ddp import free_port
from test_train_guidance import reference_sac_loss, sac_guide
from train_helpers import lora_grads, lora_unet, step_inputs, tiny_config

def encode_captions(text_encoder, ids, trainable: bool):
    """The trainer's caption encoding (the SD v1.5 family's encode_batch): the context alone."""
    return SD15().encode_batch([text_encoder], {"input_ids": ids}, torch.float32, trainable)[0]


PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "out_proj"), "mlp": ("fc1", "fc2")}
CAPTIONS = ["a photo portrait of a woman, face, eyes", "a man with short dark hair"]


def with_text_encoder_lora(seed: int = 0, alpha: float = 4.0):
    """The demo model with random-B LoRAs (so both change outputs) on the UNet and the text encoder."""
    components = lora_unet(seed)
    components.text_encoder.requires_grad_(False)
    add_text_encoder_lora(components.text_encoder, rank=4, alpha=alpha)
    with torch.no_grad():
        for name, param in components.text_encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return components


def caption_ids(components) -> torch.Tensor:
    return components.tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids


def text_encoder_out(text_encoder, ids) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(ids)[0]


def unet_out(unet, s) -> torch.Tensor:
    with torch.no_grad():
        return unet(s.noisy, s.timesteps, s.cond).sample


def test_lora_sits_on_every_clip_attention_and_mlp_projection():
    text_encoder = build_components().text_encoder
    text_encoder.requires_grad_(False)
    top = "text_model." if hasattr(text_encoder, "text_model") else ""  # transformers 5 flattens CLIPTextModel
    expected = {f"{top}encoder.layers.{i}.{block}.{name}" for i in range(text_encoder.config.num_hidden_layers)
                for block, names in PROJECTIONS.items() for name in names}
    linears = {n for n, m in text_encoder.named_modules() if isinstance(m, torch.nn.Linear)}
    assert expected == linears  # every linear layer of CLIP's text encoder is one of these

    add_text_encoder_lora(text_encoder, rank=4, alpha=8, dropout=0.25)
    lora = {n: m for n, m in text_encoder.named_modules() if hasattr(m, "lora_A")}
    assert set(lora) == expected
    for module in lora.values():
        assert module.lora_A["default"].weight.shape == (4, module.base_layer.in_features)
        assert module.scaling["default"] == 2.0 and module.lora_dropout["default"].p == 0.25
        assert not module.lora_B["default"].weight.any()  # starts unchanged
    trainable = {n for n, p in text_encoder.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * len(expected) and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_text_encoder_flag_errors(tmp_path, capsys):
    with pytest.raises(UsageError, match="add --train_text_encoder"):
        TrainConfig(text_encoder_lr=1e-4).validate()
    for bad in (0.0, -1e-4, float("nan"), float("inf")):
        with pytest.raises(UsageError, match="--text_encoder_lr must be > 0"):
            TrainConfig(train_text_encoder=True, text_encoder_lr=bad).validate()
    with pytest.raises(SystemExit) as exit_info:
        main(["--text_encoder_lr", "1e-4", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "--train_text_encoder" in err
    assert TrainConfig(train_text_encoder=True, text_encoder_lr=1e-5).validate().text_encoder_lr == 1e-5


def test_guided_loss_text_encoder_gradient_matches_the_written_out_loss():
    """Both UNet forwards read the same cond: the text encoder's gradient is the sum of both paths."""
    components = with_text_encoder_lora()
    text_encoder, unet, ids = components.text_encoder, components.unet, caption_ids(components)
    s = step_inputs(components)

    s.cond = text_encoder(ids)[0]
    ref_loss, ref_mass = reference_sac_loss(components, s, ratio=0.5)
    ref_loss.backward()
    expected = lora_grads(text_encoder)
    text_encoder.zero_grad(set_to_none=True)
    unet.zero_grad(set_to_none=True)
    assert (ref_mass > 1.0).any() and not (ref_mass > 1.0).all(), "needs a partial mask"

    guide = sac_guide(components, ratio=0.5)
    s.cond = encode_captions(text_encoder, ids, trainable=True)
    result = guide(unet, s)
    result.loss.backward()
    got = lora_grads(text_encoder)
    assert got.keys() == expected.keys() and len(got) == 2 * 6 * text_encoder.config.num_hidden_layers
    torch.testing.assert_close(result.loss, ref_loss, rtol=0, atol=1e-5)
    for name, grad in got.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-7, msg=name)

    # the check can fail: the gradient through the first forward alone is far from it
    text_encoder.zero_grad(set_to_none=True)
    s.cond = encode_captions(text_encoder, ids, trainable=True)
    sac_guide(components, ratio=0.5, detach_degraded=True)(unet, s).loss.backward()
    first_only = lora_grads(text_encoder)
    assert max((first_only[n] - expected[n]).abs().max() / expected[n].abs().max() for n in expected) > 1e-2


@pytest.mark.parametrize("guide, capture", [("none", "inline"), ("sac", "separate"), ("cac", "inline"),
                                            ("cac", "separate")])
def test_every_guide_sends_a_gradient_to_the_text_encoder(guide, capture):
    components = with_text_encoder_lora()
    config = TrainConfig(guide=guide, guide_capture=capture, guide_ratio=0.5)
    guide_step = build_guide(config, components.unet, components.noise_scheduler)
    s = step_inputs(components)
    s.tokens = torch.tensor([[3, 5], [-1, -1]])  # CAC: one sample with chosen words, one without
    s.cond = encode_captions(components.text_encoder, caption_ids(components), trainable=True)
    guide_step(components.unet, s).loss.backward()
    grads = lora_grads(components.text_encoder)
    assert grads and all(torch.isfinite(g).all() and g.abs().max() > 0 for g in grads.values())


def test_encode_captions_without_training_keeps_no_graph():
    components = with_text_encoder_lora()
    assert not encode_captions(components.text_encoder, caption_ids(components), trainable=False).requires_grad


def test_text_encoder_gradient_checkpointing_reruns_layers_and_keeps_the_gradients():
    components = with_text_encoder_lora()
    text_encoder, ids = components.text_encoder, caption_ids(components)
    text_encoder.train()
    calls = [0]
    top = "text_model." if hasattr(text_encoder, "text_model") else ""
    # a module inside the checkpointed layer starts again when backward recomputes the layer (a pre-hook:
    # the recompute stops once it has what backward needs, before the module's forward would return)
    text_encoder.get_submodule(f"{top}encoder.layers.0.mlp").register_forward_pre_hook(
        lambda *args: calls.__setitem__(0, calls[0] + 1))
    text_encoder(ids)[0].pow(2).mean().backward()
    plain, plain_calls = lora_grads(text_encoder), calls[0]
    text_encoder.zero_grad(set_to_none=True)
    enable_text_encoder_checkpointing(text_encoder)
    calls[0] = 0
    text_encoder(ids)[0].pow(2).mean().backward()
    assert plain_calls == 1 and calls[0] == 2  # the layer's forward ran again inside backward
    for name, grad in lora_grads(text_encoder).items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-8, msg=name)


def test_mixed_precision_keeps_the_text_encoder_lora_in_fp32():
    from types import SimpleNamespace

    from sat_train.run.prepare import prepare_models

    config = TrainConfig(train_text_encoder=True, gradient_checkpointing=True, output_dir="unused")
    components, _ = prepare_models(config, SimpleNamespace(device=torch.device("cpu")), torch.bfloat16)
    dtypes = {}
    for name, param in components.text_encoder.named_parameters():
        dtypes.setdefault(("lora" if "lora_" in name else "frozen", param.requires_grad), set()).add(param.dtype)
    assert dtypes == {("lora", True): {torch.float32}, ("frozen", False): {torch.bfloat16}}
    assert any(getattr(m, "gradient_checkpointing", False) for m in components.text_encoder.modules())


def test_two_param_groups_are_scaled_and_scheduled_alike():
    config = TrainConfig(learning_rate=1e-3, train_text_encoder=True, text_encoder_lr=2e-4, scale_lr=True,
                         train_batch_size=2, gradient_accumulation_steps=3, lr_scheduler="linear", lr_warmup_steps=2,
                         max_train_steps=10)
    unet_param, te_param = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    optimizer, learning_rate = make_scaled_optimizer(config, [unet_param], 1, [[te_param]])
    assert learning_rate == pytest.approx(1e-3 * 6)
    assert [g["params"] for g in optimizer.param_groups] == [[unet_param], [te_param]]
    scheduler, _ = make_lr_scheduler(config, optimizer, batches=30, num_processes=1)
    for step in range(6):  # diffusers' linear schedule: warmup to the base lr over 2 steps, then down to 0 at 10
        factor = step / 2 if step < 2 else (10 - step) / 8
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert lrs == pytest.approx([1e-3 * 6 * factor, 2e-4 * 6 * factor]), step
        optimizer.step()
        scheduler.step()
    # without --text_encoder_lr the text encoder trains at --learning_rate
    config = TrainConfig(learning_rate=3e-4, train_text_encoder=True)
    optimizer, _ = make_scaled_optimizer(config, [unet_param], 1, [[te_param]])
    assert [g["lr"] for g in optimizer.param_groups] == [3e-4, 3e-4]


def test_validation_images_use_the_trained_text_encoder_in_eval_mode():
    """generate_images (validation) runs the text encoder with its LoRA, without LoRA dropout, and puts
    it back in training mode afterwards."""
    import numpy as np

    from sat_train.outputs.samples import generate_images, prompt_generator, validation_prompt

    components = lora_unet()
    components.text_encoder.requires_grad_(False)
    add_text_encoder_lora(components.text_encoder, rank=4, dropout=0.5)
    config = TrainConfig(validation_prompt="a photo portrait of a woman, face", num_validation_images=1,
                         resolution=64, seed=0)
    text_encoder = components.text_encoder.train()

    def image():
        prompt = validation_prompt(config)
        return np.asarray(generate_images(components, components.unet, prompt, prompt_generator(prompt, 0, 0),
                                          torch.float32)[0]).astype(int)

    untrained = image()  # the text encoder's LoRA still at B = 0
    with torch.no_grad():
        for name, param in text_encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    first, second = image(), image()
    assert text_encoder.training
    assert np.array_equal(first, second)  # no dropout: the same seed gives the same image
    assert np.abs(first - untrained).max() > 0


def fresh_pipeline():
    fresh = build_components()
    return fresh, StableDiffusionPipeline(vae=fresh.vae, text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer,
                                          unet=fresh.unet, scheduler=fresh.noise_scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)


def frozen_state(model) -> dict:
    """The model's own (non-LoRA) weights under their original names (peft moves them to base_layer)."""
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}


def test_run_trains_both_loras_only_and_both_exports_reproduce_the_text_encoder(tmp_path, monkeypatch):
    runs = []
    prepare_run = loop_module.prepare_run
    monkeypatch.setattr(loop_module, "prepare_run", lambda config: runs.append(prepare_run(config)) or runs[-1])
    train(tiny_config(tmp_path, max_train_steps=2, train_text_encoder=True, text_encoder_lr=5e-4, lora_alpha=8,
                      export_format="both", guide="sac"))
    (run,) = runs
    trained = run.components
    text_encoder, unet = trained.text_encoder, trained.unet

    groups = run.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-3, 5e-4]
    assert [set(map(id, g["params"])) for g in groups] == [set(map(id, lora_parameters(unet))),
                                                          set(map(id, lora_parameters(text_encoder)))]
    # --max_grad_norm clips over both LoRAs together
    assert set(map(id, run.params)) == set(map(id, groups[0]["params"])) | set(map(id, groups[1]["params"]))
    base = build_components()
    for model, original in ((text_encoder, base.text_encoder), (unet, base.unet)):
        state, expected = frozen_state(model), original.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected), "a frozen weight changed"
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # trained away from B = 0

    ids = caption_ids(trained)
    s = step_inputs(trained)
    want_te, want_unet = text_encoder_out(text_encoder.eval(), ids), unet_out(unet.eval(), s)
    kohya = load_file(tmp_path / KOHYA_WEIGHTS_NAME)
    top = "text_model." if not hasattr(text_encoder, "text_model") else ""
    kohya_te = {f"lora_te_{(top + n).replace('.', '_')}" for n, m in text_encoder.named_modules()
                if hasattr(m, "lora_A")}
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
            for k in kohya if k.startswith("lora_te")} == kohya_te
    assert all(kohya[f"{prefix}.alpha"].item() == 8.0 for prefix in kohya_te)
    for name in (LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME):
        fresh, pipe = fresh_pipeline()
        untrained = text_encoder_out(fresh.text_encoder, ids)
        pipe.load_lora_weights(str(tmp_path), weight_name=name)
        got_te = text_encoder_out(fresh.text_encoder.eval(), ids)
        assert (got_te - untrained).abs().max() > 1e-3, f"{name}: the loaded LoRA must change the text encoder"
        torch.testing.assert_close(got_te, want_te, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(unet_out(fresh.unet.eval(), s), want_unet, rtol=1e-5, atol=1e-5, msg=name)


def test_save_precision_covers_the_text_encoder_lora(tmp_path):
    from sat_train.outputs.lora_files import export_lora, export_precision_problem

    components = with_text_encoder_lora()
    unet, text_encoder = components.unet, components.text_encoder
    export_lora(unet, tmp_path, "both", "fp16", text_encoders=[text_encoder])
    for name, prefix in ((LORA_WEIGHTS_NAME, "text_encoder."), (KOHYA_WEIGHTS_NAME, "lora_te_")):
        saved = {k: v for k, v in load_file(tmp_path / name).items() if k.startswith(prefix)}
        assert saved and {v.dtype for v in saved.values()} == {torch.float16}, name
    assert export_precision_problem(unet, "both", "fp16", [text_encoder]) is None
    with torch.no_grad():
        text_encoder.get_submodule(next(n for n, m in text_encoder.named_modules() if hasattr(m, "lora_B"))
                                   ).lora_B["default"].weight[0, 0] = 1e6
    problem = export_precision_problem(unet, "both", "fp16", [text_encoder])
    assert problem is not None and problem.startswith("lora_te_") and "1e+06" in problem


def test_resume_with_the_other_text_encoder_setting_is_refused(tmp_path):
    components = with_text_encoder_lora()
    save_lora(components.unet, tmp_path / "unet-only")
    save_lora(components.unet, tmp_path / "both", text_encoders=components.text_encoders)
    check_checkpoint_text_encoder(tmp_path / "unet-only", False, components.unet)
    check_checkpoint_text_encoder(tmp_path / "both", True, components.unet)
    with pytest.raises(UsageError, match="saved without --train_text_encoder"):
        check_checkpoint_text_encoder(tmp_path / "unet-only", True, components.unet)
    with pytest.raises(UsageError, match="saved with --train_text_encoder"):
        check_checkpoint_text_encoder(tmp_path / "both", False, components.unet)


@pytest.mark.parametrize("demo_model, encoders", [("sd15", {"text_encoder"}),
                                                   ("sdxl", {"text_encoder", "text_encoder_2"})])
def test_killed_run_resumes_to_the_uninterrupted_text_encoder_lora(tmp_path, demo_model, encoders):
    """As test_train_crash: killed while checkpoint-4 is written, resumed from checkpoint-2 (SDXL: the
    LoRA of both text encoders)."""
    extra = ["--demo_model", demo_model, "--train_text_encoder", "--text_encoder_lr", "5e-4", "--lora_dropout", "0.1"]
    expected = load_file(train(tiny_config(tmp_path / "straight", max_train_steps=4, guide="sac", demo_model=demo_model,
                                           train_text_encoder=True, text_encoder_lr=5e-4, lora_dropout=0.1)))
    assert {k.split(".")[0] for k in expected} == {"unet", *encoders}
    assert all(v.abs().max() > 0 for k, v in expected.items() if ".lora_B." in k)  # each LoRA trained
    out = tmp_path / "crashy"
    proc = run_crashable(out, "checkpoint-4:mid", resume=False, extra=extra)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    proc = run_crashable(out, None, resume=True, extra=extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming from {out / 'checkpoint-2'}" in proc.stdout
    got = load_file(out / LORA_WEIGHTS_NAME)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def ddp_worker(rank: int, port: int, world: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        components = with_text_encoder_lora()  # the same weights on every rank, as DDP requires
        text_encoder, unet = components.text_encoder, components.unet
        guide = sac_guide(components, ratio=0.5)
        ids = caption_ids(components)

        def rank_step(r: int, text_encoder_model, unet_model):
            s = step_inputs(components, seed=1 + r)
            s.cond = encode_captions(text_encoder_model, ids.roll(r, dims=0), trainable=True)
            guide(unet_model, s).loss.backward()

        per_rank = []  # expected: each rank's step on the bare models, gradients averaged
        for r in range(world):
            rank_step(r, text_encoder, unet)
            per_rank.append(lora_grads(text_encoder))
            text_encoder.zero_grad(set_to_none=True)
            unet.zero_grad(set_to_none=True)
        expected = {name: sum(g[name] for g in per_rank) / world for name in per_rank[0]}
        rank_step(rank, DistributedDataParallel(text_encoder), DistributedDataParallel(unet))
        got = lora_grads(text_encoder)
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-7, msg=f"rank {rank}: {name}")
    finally:
        dist.destroy_process_group()


def test_ddp_text_encoder_gradients_are_the_mean_of_the_ranks():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(ddp_worker, args=(free_port(), 2), nprocs=2, join=True)
