"""Regularization images: kohya's --reg_data_dir (N_class/ folders, balanced against the training images),
--prior_loss_weight, --prior_target base, --guide_reg_samples, diffusers' --with_prior_preservation class
images; expectations written out here (kohya's balancing loop, the weight formula, an independent LoRA-off
forward)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import sat_train.data.dataset as data_module
import sat_train.run.loop as loop_module
from sat_train import train
from sat_train.cli import main
from sat_train.data.subsets import balanced_repeats
from sat_train.demo import build_components, build_sdxl_components, save_components
from sat_train.guide.guidance import SATGuide, make_saliency
from sat_train.guide.prior import with_base_targets, with_prior_loss_weights
from sat_train.guide.settings import GuideSettings
from sat_train.outputs.lora_files import KOHYA_WEIGHTS_NAME
from sat_train.run.class_images import class_images, generate_class_images
from train_helpers import assert_same_tensors, lora_unet, step_inputs, tiny_config


def photo(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_images(folder, count: int, caption: str | None = None, seed: int = 0, first: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + count):
        photo(seed * 100 + i).save(folder / f"img{i:02d}.png")
        if caption is not None:
            (folder / f"img{i:02d}.txt").write_text(caption)


def kohya_balance(reg_repeats: list[int], num_train: int) -> list[int]:
    """kohya-ss/sd-scripts' DreamBoothDataset loop, transcribed: n counts registered samples."""
    repeats = [0] * len(reg_repeats)
    if sum(reg_repeats) == 0:
        return repeats
    n, first_loop = 0, True
    while n < num_train:
        for i, r in enumerate(reg_repeats):
            if first_loop:
                repeats[i] = r
                n += r
            else:
                repeats[i] += 1
                n += 1
            if n >= num_train:
                break
        first_loop = False
    return repeats


@pytest.mark.parametrize("reg, train_count", [([1, 1, 1], 7), ([3, 3], 4), ([2, 5, 1], 3), ([1], 1), ([4, 1], 0),
                                              ([1, 1, 1, 1, 1], 2), ([2, 2], 9)])
def test_balancing_is_kohyas_loop(reg, train_count):
    assert balanced_repeats(reg, train_count) == kohya_balance(reg, train_count)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return str(save_components(build_components(), tmp_path_factory.mktemp("model") / "tiny-sd"))


def reg_config(tmp_path, tiny_sd, **overrides):
    settings = dict(pretrained_model_name_or_path=tiny_sd, train_data_dir=str(tmp_path / "train"),
                    reg_data_dir=str(tmp_path / "reg"), caption_extension=".txt", guide="none")
    return tiny_config(tmp_path / "out", **{**settings, **overrides})


def test_a_run_holds_the_balanced_share_of_regularization_samples(tmp_path, monkeypatch, tiny_sd):
    # 2 images x 3 repeats = 6 training samples an epoch; regularization: 2_woman (2 images, one without a
    # caption file: it takes the class name) then 1_person (3 images)
    write_images(tmp_path / "train" / "3_sks woman", 2, "sks woman")
    write_images(tmp_path / "reg" / "2_woman", 1, "a woman, smiling", seed=1)
    write_images(tmp_path / "reg" / "2_woman", 1, None, seed=1, first=1)
    write_images(tmp_path / "reg" / "1_person", 3, "a person", seed=2)
    seen = []
    original = data_module.CaptionedImages.__getitem__

    def spy(self, index):
        item = original(self, index)
        seen.append((self.records[index], bool(item["is_reg"])))
        return item

    monkeypatch.setattr(data_module.CaptionedImages, "__getitem__", spy)
    batches = []
    make = loop_module.make_step_inputs

    def spy_inputs(batch, *args, **kwargs):
        batches.append(batch["is_reg"].clone())
        return make(batch, *args, **kwargs)

    monkeypatch.setattr(loop_module, "make_step_inputs", spy_inputs)
    # 6 training samples; kohya's loop takes the regularization images with their folder's repeats until they
    # reach 6: 1 + 1 + 1 + 2 + 2 = 7 (the last one taken keeps all its repeats); 13 samples, batch 2: 7 steps
    out = train(reg_config(tmp_path, tiny_sd, max_train_steps=7, prior_loss_weight=0.5, export_format="both"))
    # folders in name order (1_person's 3 images, then 2_woman's 2), each image with its folder's repeats
    reg_order = [(f"1_person/img{i:02d}.png", "a person") for i in range(3)] + \
                [("2_woman/img00.png", "a woman, smiling"), ("2_woman/img01.png", "woman")]
    expected_counts = kohya_balance([1, 1, 1, 2, 2], 6)
    reg_seen = [(str(path), caption) for (path, caption), is_reg in seen if is_reg]
    for (name, caption), count in zip(reg_order, expected_counts):
        assert sum(path.endswith(name) and cap == caption for path, cap in reg_seen) == count, (name, reg_seen)
    assert len(reg_seen) == sum(expected_counts) == 7
    assert sum(not is_reg for _, is_reg in seen) == 6
    assert sum(int(b.sum()) for b in batches) == 7 and sum(len(b) for b in batches) == 13
    with safe_open(str(out.parent / KOHYA_WEIGHTS_NAME), "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_reg_images"] == "7"  # 3 x 1 + 2 x 2, before balancing, as kohya counts
    # the training folder's keys as kohya's train_network.py writes them; tags counted once per image (kohya's
    # set_tag_frequency), the regularization folders' too
    assert json.loads(meta["ss_dataset_dirs"]) == {"3_sks woman": {"n_repeats": 3, "img_count": 2}}
    assert meta["ss_num_train_images"] == "6"
    assert json.loads(meta["ss_tag_frequency"]) == {"3_sks woman": {"sks woman": 2},
                                                    "2_woman": {"a woman": 1, "smiling": 1, "woman": 1},
                                                    "1_person": {"a person": 3}}
    assert meta["ss_prior_loss_weight"] == "0.5"
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_person": {"n_repeats": 1, "img_count": 3},
                                                      "2_woman": {"n_repeats": 2, "img_count": 2}}
    assert meta["sat_prior_target"] == "data" and meta["sat_guide_reg_samples"] == "False"


def test_prior_loss_weights_follow_kohyas_formula():
    is_reg = torch.tensor([False, True, True, False])
    snr_weights = torch.tensor([0.5, 2.0, 1.0, 3.0])
    got = with_prior_loss_weights(snr_weights, is_reg, 0.25)
    torch.testing.assert_close(got, torch.tensor([0.5 * 1, 2.0 * 0.25, 1.0 * 0.25, 3.0 * 1]))
    torch.testing.assert_close(with_prior_loss_weights(None, is_reg, 3.0), torch.tensor([1.0, 3.0, 3.0, 1.0]))
    # the step's loss: kohya's mean over samples of (per-sample mse x loss_weights)
    from sat_train.guide.loss import StepLoss

    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    loss = StepLoss()(pred, target, torch.tensor([1, 2, 3, 4]), got)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, (per_sample * torch.tensor([0.5, 0.5, 0.25, 3.0])).mean())


@pytest.mark.parametrize("build", [build_components, build_sdxl_components], ids=["sd15", "sdxl"])
def test_base_targets_are_the_lora_off_prediction(build):
    components = lora_unet(seed=3, build=build)
    unet = components.unet
    s = step_inputs(components, batch=4)
    s.is_reg = torch.tensor([True, False, True, False])
    got = with_base_targets(unet, s)
    # independently: a LoRA-free copy of the UNet (LoRA layers' base weights) on the two regularization rows
    plain = build().unet
    state = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    plain.load_state_dict(state)
    rows = [0, 2]
    added = None if s.added_cond_kwargs is None else {k: v[rows] for k, v in s.added_cond_kwargs.items()}
    with torch.no_grad():
        expected = plain(s.noisy[rows], s.timesteps[rows], s.cond[rows], added_cond_kwargs=added,
                         return_dict=False)[0]
        with_lora = unet(s.noisy[rows], s.timesteps[rows], s.cond[rows], added_cond_kwargs=added,
                         return_dict=False)[0]
    torch.testing.assert_close(got.target[[0, 2]], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_lora, expected, atol=1e-3)  # LoRA matters here: the test can fail
    assert torch.equal(got.target[[1, 3]], s.target[[1, 3]])
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(layer.disable_adapters for layer in unet.modules() if isinstance(layer, BaseTunerLayer))
    s.is_reg = torch.tensor([False, False, False, False])
    assert with_base_targets(unet, s) is s  # no regularization sample: no extra forward


def test_guide_ratio_is_zero_on_unguided_samples():
    components = lora_unet(seed=4)
    unet = components.unet
    settings = GuideSettings(ratio=0.7)
    guide = SATGuide(make_saliency(unet, "sac"), components.noise_scheduler.alphas_cumprod, settings)
    s = step_inputs(components, batch=4)
    s.guided = torch.tensor([True, False, True, False])
    with torch.no_grad():
        g = guide.guided_prediction(unet, s)
    pred, deg = g.pred.float(), g.pred_degraded.float()
    r = torch.tensor([0.7, 0.0, 0.7, 0.0]).view(4, 1, 1, 1)
    torch.testing.assert_close(g.guided, pred + r * (pred - deg))
    assert not torch.allclose(pred[0], deg[0])  # the guided term is not zero: the test can fail


def test_class_images_are_generated_once(tmp_path):
    components = build_components()
    folder = tmp_path / "class"
    write_images(folder, 1)
    written = generate_class_images(folder, "a photo of a woman", 3, components, (32, 32), seed=0, batch_size=2,
                                    steps=2, progress=False)
    assert written == 2 and len(class_images(folder)) == 3
    before = {p.name: p.read_bytes() for p in class_images(folder)}
    assert generate_class_images(folder, "a photo of a woman", 3, components, (32, 32), seed=0, steps=2,
                                 progress=False) == 0
    assert {p.name: p.read_bytes() for p in class_images(folder)} == before
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporaries left
    generated = [p for p in class_images(folder) if not p.name.startswith("img")]
    assert len(generated) == 2 and all(Image.open(p).size == (32, 32) for p in generated)


def test_with_prior_preservation_trains_on_generated_class_images(tmp_path, monkeypatch, tiny_sd):
    import sat_train.run.class_images as class_module

    write_images(tmp_path / "train" / "2_sks woman", 1, "sks woman")
    original = class_module.generate_class_images
    monkeypatch.setattr(class_module, "generate_class_images",
                        lambda *a, **k: original(*a, **{**k, "steps": 2, "progress": False}))
    config = reg_config(tmp_path, tiny_sd, reg_data_dir=None, with_prior_preservation=True,
                        class_data_dir=str(tmp_path / "class"), class_prompt="a woman", num_class_images=3,
                        max_train_steps=1)
    assert train(config).is_file()
    assert len(class_images(tmp_path / "class")) == 3


@pytest.mark.parametrize("argv, fragment", [
    (["--reg_data_dir", "{tmp}/missing"], "--reg_data_dir {tmp}/missing is not a folder"),
    (["--reg_data_dir", "{tmp}/flat"], "holds no subfolders"),
    (["--prior_loss_weight", "0.5"], "--prior_loss_weight weights regularization images, and there are none"),
    (["--prior_target", "base"], "--prior_target base sets the target of regularization images"),
    (["--guide_reg_samples"], "--guide_reg_samples guides regularization images"),
    (["--with_prior_preservation", "--class_prompt", "a woman"], "--with_prior_preservation needs --class_data_dir"),
    (["--with_prior_preservation", "--class_data_dir", "{tmp}/class"], "needs --class_prompt"),
    (["--reg_data_dir", "{tmp}/reg", "--prior_loss_weight", "-1"], "--prior_loss_weight must be >= 0"),
    (["--with_prior_preservation", "--class_data_dir", "{tmp}/junk", "--class_prompt", "a"],
     "--class_data_dir {tmp}/junk holds notes.txt, not an image"),
    (["--class_prompt", "a woman"], "--class_prompt is read with --with_prior_preservation"),
])
def test_bad_regularization_flags_exit_2_before_models_load(tmp_path, capsys, argv, fragment):
    (tmp_path / "flat").mkdir()
    write_images(tmp_path / "reg" / "1_woman", 1, "a woman")
    write_images(tmp_path / "junk", 1)
    (tmp_path / "junk" / "notes.txt").write_text("x")
    write_images(tmp_path / "train" / "1_sks", 1, "sks")
    args = ["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--train_data_dir",
            str(tmp_path / "train"), "--caption_extension", ".txt", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        main(args + [a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2
    assert fragment.format(tmp=tmp_path) in err and len(err.splitlines()) == 1, err


def test_an_empty_reg_folder_is_one_line(tmp_path, capsys):
    write_images(tmp_path / "train" / "1_sks", 1, "sks")
    (tmp_path / "reg" / "1_woman").mkdir(parents=True)
    with pytest.raises(SystemExit) as stop:
        main(["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--train_data_dir",
              str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"), "--caption_extension", ".txt",
              "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and f"--reg_data_dir {tmp_path / 'reg'} holds no images" in err[0], err


@pytest.mark.parametrize("extra", [dict(prior_target="base"), dict(guide="sac", guide_reg_samples=True,
                                                                   prior_loss_weight=0.3)])
def test_resume_with_regularization_matches_the_uninterrupted_run(tmp_path, tiny_sd, extra):
    import random

    from safetensors.torch import load_file

    write_images(tmp_path / "train" / "2_sks woman", 2, "sks woman")
    write_images(tmp_path / "reg" / "1_woman", 3, "a woman", seed=1)
    common = dict(checkpointing_steps=3, **extra)
    # 4 training + 4 regularization samples, batch 2: 4 steps an epoch; resume at step 3 is mid-epoch
    straight = train(reg_config(tmp_path / "a", tiny_sd, max_train_steps=5,
                                train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"), **common))
    resumed_dir = tmp_path / "b"
    train(reg_config(resumed_dir, tiny_sd, max_train_steps=3, train_data_dir=str(tmp_path / "train"),
                     reg_data_dir=str(tmp_path / "reg"), **common))
    random.seed(99)
    torch.manual_seed(99)
    resumed = train(reg_config(resumed_dir, tiny_sd, max_train_steps=5, resume_from_checkpoint="latest",
                               train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"), **common))
    expected, got = load_file(straight), load_file(resumed)
    assert_same_tensors(got, expected)


def test_a_killed_run_with_regularization_resumes_bit_exact(tmp_path):
    """test_train_crash's SIGKILL resume on the demo model and photos with regularization images, their
    LoRA-off targets and SAC: killed while checkpoint-4 is written, resumed from checkpoint-2 (mid-epoch:
    6 photos + 6 regularization samples, batch 2)."""
    import signal

    from safetensors.torch import load_file

    from test_train_crash import run as run_cli_killed
    from train_helpers import LORA_FILE

    write_images(tmp_path / "reg" / "1_person", 4, "a person", seed=3)
    reg = ["--reg_data_dir", str(tmp_path / "reg"), "--prior_target", "base", "--prior_loss_weight", "0.7"]
    expected = load_file(train(tiny_config(tmp_path / "straight", max_train_steps=4, guide="sac",
                                           reg_data_dir=str(tmp_path / "reg"), prior_target="base",
                                           prior_loss_weight=0.7)))
    out = tmp_path / "crashy"
    proc = run_cli_killed(out, "checkpoint-4:mid", resume=False, extra=reg)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert f"data check {tmp_path / 'reg'}: 4 usable images" in proc.stdout, proc.stdout[-2000:]
    proc = run_cli_killed(out, None, resume=True, extra=reg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming from {out / 'checkpoint-2'}" in proc.stdout
    got = load_file(out / LORA_FILE)
    assert_same_tensors(got, expected)
