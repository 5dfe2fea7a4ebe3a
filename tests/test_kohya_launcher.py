"""``python -m sat_train.kohya``: SAT in kohya-ss/sd-scripts by subclassing their trainer.

sd-scripts is not on the package registry, so a stand-in checkout is written to a temporary folder:
``train_network.py`` and ``sdxl_train_network.py`` shaped like theirs at 48d368f (a trainer class whose
``get_noise_pred_and_target`` noises the latents and calls the UNet through ``call_unet``, including
their differential-output-preservation prior call with ``indices``; ``setup_parser()``; their
``__main__``; a ``library/train_util.py``), on sat's tiny demo models with a LoRA. Each run saves its
training step (prediction, loss, LoRA gradients, the UNet forwards) and its LoRA metadata; the guided
step is checked against ``guided_prediction`` called directly on the same inputs, ``--sat_guide none``
against their script run as they run it. ``SAT_SD_SCRIPTS=/path/to/sd-scripts`` also runs the real
``train_network.py --help`` through the launcher.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import types

import pytest
import torch

from sat_train import guided_prediction, install_sat_capture
from sat_train.guide.dropin import caption_token_positions
from sat_train.guide.settings import GuideSettings
from sat_train.kohya import main

SEED = 3

TRAIN_UTIL = '''
import torch

def verify_command_line_training_args(args):
    args.verified = True

def read_config_from_file(args, parser):
    return args

def get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents):
    g = torch.Generator().manual_seed(args.seed + 1)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.tensor([150, 650])
    return noise, noise_scheduler.add_noise(latents, noise, timesteps), timesteps
'''

# the part of the stand-in that the test also builds for its reference: models, LoRA, one batch
MODELS = '''
import torch
from sat_train.demo import build_components, build_sdxl_components
from sat_train.models.lora import add_lora

CAPTIONS = ["a photo of a face", "a photo of a tree"]

def build(sdxl, seed):
    components = build_sdxl_components() if sdxl else build_components()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        add_lora(components.unet, rank=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in components.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3, generator=g)
    return components

def one_batch(components, sdxl, seed, dop):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    ids = components.tokenizer(CAPTIONS, padding="max_length", max_length=components.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        conds = [components.text_encoder(ids)[0]]
    batch = {"captions": CAPTIONS}
    if sdxl:  # their SDXL conditioning: both encoders' states side by side, and the pooled output
        config = components.unet.config
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        conds = [torch.randn(2, 77, config.cross_attention_dim, generator=g), torch.randn(2, pooled, generator=g)]
        batch["time_ids"] = torch.tensor([[128, 128, 0, 0, 128, 128]] * 2, dtype=torch.float32)
    if dop:
        batch["custom_attributes"] = [{}, {"diff_output_preservation": True}]
    return latents, conds, batch
'''

TRAIN_NETWORK = '''
import argparse
import json
from pathlib import Path

import torch

import library.train_util as train_util
from library.models import build, one_batch


class Network:
    def set_multiplier(self, value):
        self.multiplier = value


class Accelerator:
    import contextlib
    autocast = staticmethod(contextlib.nullcontext)


class NetworkTrainer:
    def __init__(self):
        self.is_sdxl = False

    def get_tokenizers(self, tokenize_strategy):
        return [tokenize_strategy]

    def call_unet(self, args, accelerator, unet, noisy_latents, timesteps, text_conds, batch, weight_dtype, **kwargs):
        noise_pred = unet(noisy_latents, timesteps, text_conds[0]).sample
        return noise_pred

    def get_noise_pred_and_target(
        self, args, accelerator, noise_scheduler, latents, batch, text_encoder_conds, unet, network, weight_dtype,
        train_unet, is_train=True,
    ):
        noise, noisy_latents, timesteps = train_util.get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents)
        with torch.set_grad_enabled(is_train), accelerator.autocast():
            noise_pred = self.call_unet(
                args, accelerator, unet, noisy_latents.requires_grad_(train_unet), timesteps, text_encoder_conds,
                batch, weight_dtype,
            )
        if args.v_parameterization:
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        if "custom_attributes" in batch:
            diff_output_pr_indices = [i for i, a in enumerate(batch["custom_attributes"])
                                      if a.get("diff_output_preservation")]
            if len(diff_output_pr_indices) > 0:
                network.set_multiplier(0.0)
                with torch.no_grad(), accelerator.autocast():
                    noise_pred_prior = self.call_unet(
                        args, accelerator, unet, noisy_latents, timesteps, text_encoder_conds, batch, weight_dtype,
                        indices=diff_output_pr_indices,
                    )
                network.set_multiplier(1.0)
                target[diff_output_pr_indices] = noise_pred_prior.to(target.dtype)
        return noise_pred, target, timesteps, None

    def update_metadata(self, metadata, args):
        pass

    def train(self, args):
        components = build(self.is_sdxl, args.seed)
        tokenizers = self.get_tokenizers(components.tokenizer)
        unet, forwards = components.unet, []
        unet.register_forward_hook(lambda m, i, out: forwards.append(out[0].requires_grad))
        latents, conds, batch = one_batch(components, self.is_sdxl, args.seed, args.dop)
        accelerator, network = Accelerator(), Network()
        noise_pred, target, timesteps, weighting = self.get_noise_pred_and_target(
            args, accelerator, components.noise_scheduler, latents, batch, conds, unet, network, torch.float32, True,
            is_train=True)
        loss = torch.nn.functional.mse_loss(noise_pred.float(), target.float())
        loss.backward()
        self.get_noise_pred_and_target(args, accelerator, components.noise_scheduler, latents, batch, conds, unet,
                                       network, torch.float32, True, is_train=False)
        metadata = {"ss_network_dim": "4"}
        self.update_metadata(metadata, args)
        grads = {n: p.grad for n, p in unet.named_parameters() if "lora" in n and p.grad is not None}
        out = Path(args.output_dir)
        torch.save({"noise_pred": noise_pred.detach(), "target": target, "loss": loss.detach(), "grads": grads,
                    "forwards": forwards, "tokenizers": len(tokenizers)}, out / "step.pt")
        (out / "metadata.json").write_text(json.dumps(metadata))


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--v_parameterization", action="store_true")
    parser.add_argument("--max_token_length", type=int, default=None)
    parser.add_argument("--weighted_captions", action="store_true")
    parser.add_argument("--dop", action="store_true", help="stand-in: a differential output preservation sample")
    return parser


if __name__ == "__main__":
    parser = setup_parser()

    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)

    trainer = NetworkTrainer()
    trainer.train(args)
'''

SDXL_TRAIN_NETWORK = '''
import torch

import train_network
from library import train_util


class SdxlNetworkTrainer(train_network.NetworkTrainer):
    def __init__(self):
        super().__init__()
        self.is_sdxl = True

    def call_unet(self, args, accelerator, unet, noisy_latents, timesteps, text_conds, batch, weight_dtype,
                  indices=None):
        time_ids, context, pooled = batch["time_ids"], text_conds[0], text_conds[1]
        if indices is not None and len(indices) > 0:
            noisy_latents, timesteps = noisy_latents[indices], timesteps[indices]
            time_ids, context, pooled = time_ids[indices], context[indices], pooled[indices]
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return unet(noisy_latents, timesteps, context, added_cond_kwargs=added).sample


def setup_parser():
    return train_network.setup_parser()


if __name__ == "__main__":
    parser = setup_parser()
    args = parser.parse_args()
    trainer = SdxlNetworkTrainer()
    trainer.train(args)
'''


@pytest.fixture
def sd_scripts(tmp_path):
    """A stand-in sd-scripts checkout; what the launcher imports from it is forgotten afterwards."""
    root = tmp_path / "sd-scripts"
    (root / "library").mkdir(parents=True)
    (root / "library" / "__init__.py").write_text("")
    (root / "library" / "train_util.py").write_text(TRAIN_UTIL)
    (root / "library" / "models.py").write_text(MODELS)
    (root / "train_network.py").write_text(TRAIN_NETWORK)
    (root / "sdxl_train_network.py").write_text(SDXL_TRAIN_NETWORK)
    path = list(sys.path)
    yield root
    sys.path[:] = path
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(root)):
            del sys.modules[name]


def launch(script, out, *flags):
    out.mkdir(exist_ok=True)
    main([str(script), "--output_dir", str(out), "--seed", str(SEED), *flags])
    import json

    return torch.load(out / "step.pt"), json.loads((out / "metadata.json").read_text())


def reference_step(sd_scripts, sdxl, v_parameterization, dop, settings, guide="sac", words=None):
    """The guided step written out: the same models and batch, ``guided_prediction`` called directly
    with the UNet's own conditioning, their target (the prior plain, with LoRA as the stand-in leaves it)."""
    models = types.ModuleType("reference_models")
    exec(MODELS, models.__dict__)
    util = types.ModuleType("reference_util")
    exec(TRAIN_UTIL, util.__dict__)
    components = models.build(sdxl, SEED)
    unet, scheduler = components.unet, components.noise_scheduler
    latents, conds, batch = models.one_batch(components, sdxl, SEED, dop)
    args = types.SimpleNamespace(seed=SEED)
    noise, noisy, timesteps = util.get_noise_noisy_latents_and_timesteps(args, scheduler, latents)
    added = {"text_embeds": conds[1], "time_ids": batch["time_ids"]} if sdxl else None
    handle = install_sat_capture(unet, guide=guide, settings=settings)
    tokens = caption_token_positions(components.tokenizer, models.CAPTIONS, words) if guide == "cac" else None
    guided, _ = guided_prediction(unet, noisy.requires_grad_(True), latents, timesteps, conds[0], scheduler, handle,
                                  tokens=tokens, added_cond_kwargs=added,
                                  prediction_type="v_prediction" if v_parameterization else "epsilon")
    target = scheduler.get_velocity(latents, noise, timesteps) if v_parameterization else noise
    if dop:
        with torch.no_grad():
            target[[1]] = unet(noisy[[1]], timesteps[[1]], conds[0][[1]],
                               added_cond_kwargs=None if added is None else {k: v[[1]] for k, v in added.items()}).sample
    torch.nn.functional.mse_loss(guided.float(), target.float()).backward()
    grads = {n: p.grad for n, p in unet.named_parameters() if "lora" in n and p.grad is not None}
    return guided.detach(), grads


def assert_same_step(step, guided, grads):
    torch.testing.assert_close(step["noise_pred"], guided, rtol=0, atol=0)
    assert step["grads"].keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(step["grads"][name], grads[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("script,v_parameterization,dop", [
    ("train_network.py", False, False), ("train_network.py", True, False), ("sdxl_train_network.py", False, True)])
def test_a_training_step_is_the_guided_prediction(sd_scripts, tmp_path, script, v_parameterization, dop):
    """Two gradient-carrying UNet forwards a training step through their call_unet (SDXL conditioning
    built by theirs), their DOP prior and the validation step plain; prediction and LoRA gradients
    equal guided_prediction called directly; the SAT settings reach their metadata."""
    flags = ["--sat_guide", "sac", "--sat_ratio", "0.5", "--sat_threshold", "mean", "--sat_kernel_size", "5",
             "--sat_sigma", "2.0"] + ["--v_parameterization"] * v_parameterization + ["--dop"] * dop
    step, metadata = launch(sd_scripts / script, tmp_path / "out", *flags)

    # the guided step, its DOP prior; the validation step, its DOP prior
    assert step["forwards"] == [True, True] + [False] * dop + [False] + [False] * dop
    settings = GuideSettings(ratio=0.5, threshold="mean", kernel_size=5, sigma=2.0)
    assert_same_step(step, *reference_step(sd_scripts, script.startswith("sdxl"), v_parameterization, dop, settings))
    assert metadata["ss_network_dim"] == "4"
    assert {k: v for k, v in metadata.items() if k.startswith("sat_")} == {
        "sat_guide": "sac", "sat_guide_ratio": "0.5", "sat_guide_threshold": "mean", "sat_guide_kernel_size": "5",
        "sat_guide_sigma": "2.0", "sat_guide_capture": "inline", "sat_guide_detach_degraded": "False"}


def test_cac_places_the_caption_words_with_their_tokenizer(sd_scripts, tmp_path):
    step, metadata = launch(sd_scripts / "train_network.py", tmp_path / "out", "--sat_guide", "cac",
                            "--sat_cac_words", "face,eyes")
    settings = GuideSettings()
    assert_same_step(step, *reference_step(sd_scripts, False, False, False, settings, "cac", "face,eyes"))
    assert metadata["sat_guide"] == "cac" and metadata["sat_cac_words"] == "face,eyes"


def test_sat_guide_none_is_their_plain_run_bit_for_bit(sd_scripts, tmp_path, monkeypatch):
    script = sd_scripts / "sdxl_train_network.py"  # their SD 1.x call_unet ignores DOP's indices, SDXL's takes them
    ours, our_metadata = launch(script, tmp_path / "ours", "--sat_guide", "none", "--dop")

    theirs_out = tmp_path / "theirs"
    theirs_out.mkdir()
    monkeypatch.setattr(sys, "argv", [str(script), "--output_dir", str(theirs_out), "--seed", str(SEED), "--dop"])
    monkeypatch.syspath_prepend(str(sd_scripts))
    runpy.run_path(str(script), run_name="__main__")
    theirs = torch.load(theirs_out / "step.pt")

    assert ours["forwards"] == theirs["forwards"] == [True, False, False, False]
    for key in ("noise_pred", "target", "loss"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
    assert ours["grads"].keys() == theirs["grads"].keys()
    for name in theirs["grads"]:
        torch.testing.assert_close(ours["grads"][name], theirs["grads"][name], rtol=0, atol=0, msg=name)
    assert not any(k.startswith("sat_") for k in our_metadata)


def one_line_exit_2(capsys, argv, *expected):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err


def test_bad_command_lines_are_one_line_exit_2(sd_scripts, tmp_path, capsys):
    out = ["--output_dir", str(tmp_path)]
    one_line_exit_2(capsys, [], "training script first")
    one_line_exit_2(capsys, ["--sat_guide", "sac"], "training script first")
    one_line_exit_2(capsys, [str(sd_scripts / "missing.py"), *out], "missing.py is not a Python file")
    script = sd_scripts / "train_network.py"
    one_line_exit_2(capsys, [str(script), *out, "--sat_guide", "cac", "--max_token_length", "225"],
                    "--max_token_length")
    one_line_exit_2(capsys, [str(script), *out, "--sat_guide", "cac", "--sat_cac_words", " , "], "--sat_cac_words")
    one_line_exit_2(capsys, [str(sd_scripts / "sdxl_train_network.py"), *out, "--sat_guide", "cac"],
                    "sdxl_train_network.py use --sat_guide sac")


def test_a_bad_sat_value_is_argparse_exit_2(sd_scripts, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(sd_scripts / "train_network.py"), "--output_dir", str(tmp_path), "--sat_kernel_size", "4"])
    assert exit_info.value.code == 2
    assert "--sat_kernel_size: must be an odd positive int, got 4" in capsys.readouterr().err


def test_an_older_sd_scripts_is_named_not_a_traceback(sd_scripts, tmp_path, capsys):
    """Before v0.10.0 their trainer had no get_noise_pred_and_target: one line naming what is supported."""
    script = sd_scripts / "train_network.py"
    script.write_text(TRAIN_NETWORK.replace("def get_noise_pred_and_target(", "def noise_pred_and_target("))
    one_line_exit_2(capsys, [str(script), "--output_dir", str(tmp_path), "--sat_guide", "sac"],
                    "get_noise_pred_and_target", "v0.10.0")
    script.write_text(TRAIN_NETWORK.replace("train_unet, is_train=True,", "is_train=True,"))
    one_line_exit_2(capsys, [str(script), "--output_dir", str(tmp_path)], "get_noise_pred_and_target takes", "v0.10.0")


def test_a_sat_flag_they_define_is_refused_at_start(sd_scripts, tmp_path, capsys):
    script = sd_scripts / "train_network.py"
    script.write_text(TRAIN_NETWORK.replace('    parser.add_argument("--dop"',
                                            '    parser.add_argument("--sat_ratio")\n    parser.add_argument("--dop"'))
    one_line_exit_2(capsys, [str(script), "--output_dir", str(tmp_path)], "already defines --sat_ratio")
    assert not (tmp_path / "step.pt").exists()


def test_their_help_lists_the_sat_flags(sd_scripts, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(sd_scripts / "train_network.py"), "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "SAT (sat_train.kohya)" in help_text and "--sat_guide {none,sac,cac}" in help_text
    assert "--v_parameterization" in help_text


@pytest.mark.skipif(not os.environ.get("SAT_SD_SCRIPTS"), reason="set SAT_SD_SCRIPTS to an sd-scripts checkout")
def test_real_sd_scripts_help_through_the_launcher():
    """Their real train_network.py imported by the launcher, its parser with the --sat_* flags (their own
    requirements must be installed in this environment)."""
    script = os.path.join(os.environ["SAT_SD_SCRIPTS"], "train_network.py")
    done = subprocess.run([sys.executable, "-m", "sat_train.kohya", script, "--help"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--sat_guide" in done.stdout and "--network_module" in done.stdout


def test_help_without_a_script_says_how_to_start(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m sat_train.kohya PATH/TO/train_network.py")
    assert "get_noise_pred_and_target" in out and out.count("usage:") == 1
