"""kohya-ss/sd-scripts' loss options (--loss_type, --huber_*, --debiased_estimation_loss) and noise options
(--multires_noise_iterations, --ip_noise_gamma) against their formulas written out here from sd-scripts'
library/train_util.py and library/custom_train_functions.py; l2 stays today's loss bit for bit."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors import safe_open

from sat_train.cli import main
from sat_train.config.settings import TrainConfig
from sat_train.guide.capture import MidBlockCapture
from sat_train.guide.guidance import Guide, MidBlockSaliency, SATGuide, build_loss
from sat_train.guide.loss import StepLoss, huber_threshold
from sat_train.guide.settings import GuideSettings, LossSettings
from sat_train.outputs.kohya_metadata import kohya_training_metadata
from sat_train.run.inputs import make_step_inputs, pyramid_noise
from train_helpers import lora_grads, lora_unet, step_inputs, tiny_config

T = 1000


def sd_scheduler(prediction_type="epsilon"):
    return DDPMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type)


def kohya_snr(scheduler, timesteps):
    """prepare_scheduler_for_custom_training's all_snr, at the timesteps."""
    ab = scheduler.alphas_cumprod
    return ((ab.sqrt() / (1.0 - ab).sqrt()) ** 2)[timesteps]


def kohya_huber_c(schedule, c, scale, timesteps, scheduler):
    """get_huber_threshold_if_needed."""
    if schedule == "exponential":
        alpha = -math.log(c) / T
        return torch.exp(-alpha * timesteps) * scale
    if schedule == "snr":
        ab = scheduler.alphas_cumprod[timesteps]
        sigmas = ((1.0 - ab) / ab) ** 0.5
        return (1 - c) / (1 + sigmas) ** 2 + c
    return torch.full(timesteps.shape, c * scale)


def kohya_conditional_loss(pred, target, loss_type, huber_c):
    """conditional_loss(..., reduction="none")."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = huber_c.view(-1, 1, 1, 1)
    if loss_type == "huber":
        return 2 * c * (torch.sqrt((pred - target) ** 2 + c ** 2) - c)
    return 2 * (torch.sqrt((pred - target) ** 2 + c ** 2) - c)


def kohya_loss(pred, target, timesteps, scheduler, settings: LossSettings, min_snr_gamma=None):
    """train_network.py's process_batch: per element, per-sample mean, apply_snr_weight, apply_debiased_estimation,
    mean."""
    v = scheduler.config.prediction_type == "v_prediction"
    huber_c = kohya_huber_c(settings.huber_schedule, settings.huber_c, settings.huber_scale, timesteps, scheduler)
    loss = kohya_conditional_loss(pred.float(), target.float(), settings.loss_type, huber_c).mean(dim=[1, 2, 3])
    snr = kohya_snr(scheduler, timesteps)
    if min_snr_gamma:
        loss = loss * torch.minimum(snr, torch.full_like(snr, min_snr_gamma)) / (snr + 1 if v else snr)
    if settings.debiased_estimation:
        snr_t = torch.minimum(snr, torch.ones_like(snr) * 1000)
        loss = loss * (1 / (snr_t + 1) if v else 1 / torch.sqrt(snr_t))
    return loss.mean()


def min_snr_weights(scheduler, timesteps, gamma):
    """What make_step_inputs puts in StepInputs.loss_weights for --snr_gamma (diffusers' example = kohya's)."""
    snr = kohya_snr(scheduler, timesteps)
    v = scheduler.config.prediction_type == "v_prediction"
    return torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1 if v else snr)


TIMESTEPS = torch.tensor([0, 37, 400, 999])


def predictions(seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(4, 4, 8, 8, generator=gen) * scale
    return pred, torch.randn(4, 4, 8, 8, generator=gen) * scale


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_thresholds_follow_kohyas_schedules(schedule):
    scheduler = sd_scheduler()
    settings = LossSettings(loss_type="huber", huber_schedule=schedule, huber_c=0.2, huber_scale=1.5)
    got = huber_threshold(settings, TIMESTEPS, scheduler.alphas_cumprod, T)
    torch.testing.assert_close(got, kohya_huber_c(schedule, 0.2, 1.5, TIMESTEPS, scheduler).float())
    if schedule == "exponential":  # scale at t = 0, c * scale at t = T
        assert got[0].item() == pytest.approx(1.5) and got[-1].item() == pytest.approx(0.2 * 1.5 * 0.2 ** (-1 / T))
    if schedule == "snr":  # ~1 with no noise, falls towards c as noise grows; the scale plays no part
        assert got[0] > 0.8 and torch.all(got[1:] < got[:-1]) and got[-1] < 0.21


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_each_loss_type_matches_kohyas_formula(loss_type, schedule):
    scheduler = sd_scheduler()
    settings = LossSettings(loss_type=loss_type, huber_schedule=schedule, huber_c=0.3)
    pred, target = predictions(scale=2.0)  # differences both below and above c
    loss = build_loss(settings, scheduler)(pred, target, TIMESTEPS)
    torch.testing.assert_close(loss, kohya_loss(pred, target, TIMESTEPS, scheduler, settings))


def test_huber_is_quadratic_near_zero_and_linear_far_out():
    """2c(sqrt(d^2 + c^2) - c): ~d^2 for |d| << c, ~2c|d| for |d| >> c; smooth_l1 is that over c."""
    c, t = 0.5, torch.tensor([10])
    loss = {k: StepLoss(LossSettings(loss_type=k, huber_schedule="constant", huber_c=c)) for k in ("huber", "smooth_l1")}
    small, large = torch.full((1, 4, 2, 2), 1e-2), torch.full((1, 4, 2, 2), 1e3)
    zero = torch.zeros(1, 4, 2, 2)
    assert loss["huber"](small, zero, t).item() == pytest.approx(1e-4, rel=1e-3)
    assert loss["huber"](large, zero, t).item() == pytest.approx(2 * c * 1e3, rel=1e-3)
    assert loss["smooth_l1"](large, zero, t).item() == pytest.approx(2 * 1e3, rel=1e-3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("loss_type", ["l2", "huber"])
def test_debiased_estimation_and_min_snr_combine_as_kohya_does(prediction_type, loss_type):
    scheduler = sd_scheduler(prediction_type)
    settings = LossSettings(loss_type=loss_type, debiased_estimation=True)
    pred, target = predictions(1)
    weights = min_snr_weights(scheduler, TIMESTEPS, 5.0)
    loss = build_loss(settings, scheduler)(pred, target, TIMESTEPS, weights)
    torch.testing.assert_close(loss, kohya_loss(pred, target, TIMESTEPS, scheduler, settings, min_snr_gamma=5.0))
    plain = build_loss(dataclasses.replace(settings, debiased_estimation=False), scheduler)
    assert abs(loss.item() - plain(pred, target, TIMESTEPS, weights).item()) > 1e-3  # the weights act


def test_l2_is_todays_loss_bit_for_bit():
    """The default loss, unweighted and min-SNR weighted, is the loss before --loss_type existed: F.mse_loss
    (weighted: per-sample means times the weights), loss and LoRA gradients equal to the last bit."""
    components = lora_unet()
    s = step_inputs(components, batch=4)
    unet = components.unet
    weights = min_snr_weights(components.noise_scheduler, s.timesteps, 5.0)
    for loss_weights in (None, weights):
        s.loss_weights = loss_weights
        pred = unet(s.noisy, s.timesteps, s.cond).sample
        if loss_weights is None:
            before = F.mse_loss(pred.float(), s.target.float(), reduction="mean")
        else:
            before = (F.mse_loss(pred.float(), s.target.float(), reduction="none").mean(dim=(1, 2, 3))
                      * loss_weights).mean()
        before.backward()
        expected = lora_grads(unet)
        unet.zero_grad(set_to_none=True)
        guide = Guide(build_loss(TrainConfig(loss_type="l2").loss_settings, components.noise_scheduler))
        result = guide(unet, s)
        result.loss.backward()
        assert torch.equal(result.loss, before)
        assert all(torch.equal(g, expected[n]) for n, g in lora_grads(unet).items())
        unet.zero_grad(set_to_none=True)


def test_sac_applies_the_loss_to_the_guided_prediction():
    components = lora_unet()
    s = step_inputs(components, batch=4)
    settings = LossSettings(loss_type="huber", huber_schedule="snr", huber_c=0.1)
    scheduler = components.noise_scheduler
    guide = SATGuide(MidBlockSaliency(MidBlockCapture(components.unet, "torch")), scheduler.alphas_cumprod,
                     GuideSettings(ratio=0.5, kernel_backend="torch"), loss=build_loss(settings, scheduler))
    with torch.no_grad():
        g = guide.guided_prediction(components.unet, s)
    result = guide(components.unet, s)
    torch.testing.assert_close(result.loss, kohya_loss(g.guided, s.target, s.timesteps, scheduler, settings))
    torch.testing.assert_close(result.pred_loss, kohya_loss(g.pred, s.target, s.timesteps, scheduler, settings))
    assert abs(result.loss.item() - result.pred_loss.item()) > 1e-4


# ----------------------------------------------------------------------------- the noise


def test_pyramid_noise_is_unit_std_low_frequency_and_deterministic():
    white = torch.randn(8, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    noise = pyramid_noise(white.clone(), 6, 0.3, torch.Generator().manual_seed(1))
    again = pyramid_noise(white.clone(), 6, 0.3, torch.Generator().manual_seed(1))
    other = pyramid_noise(white.clone(), 6, 0.3, torch.Generator().manual_seed(2))
    assert noise.shape == white.shape and torch.equal(noise, again) and not torch.equal(noise, other)
    assert noise.std().item() == pytest.approx(1.0, abs=1e-5)

    def neighbour_correlation(x):
        return torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1].item()

    # the upsampled coarse layers correlate neighbours, visibly once they weigh enough; white noise does not
    coarse = pyramid_noise(white.clone(), 6, 0.8, torch.Generator().manual_seed(1))
    assert abs(neighbour_correlation(white)) < 0.03 and neighbour_correlation(coarse) > 0.15
    assert neighbour_correlation(white) < neighbour_correlation(noise) < neighbour_correlation(coarse)
    # one iteration adds one full-size layer (upsampling to its own size is the identity): (n + m) / std
    gen = torch.Generator().manual_seed(3)
    one = pyramid_noise(white.clone(), 1, 0.3, gen)
    assert abs(neighbour_correlation(one)) < 0.05
    ref_gen = torch.Generator().manual_seed(3)
    torch.rand(1, generator=ref_gen)  # the size ratio, unused at i = 0
    layer = torch.randn(white.shape, generator=ref_gen)
    torch.testing.assert_close(one, (white + layer) / (white + layer).std())


def demo_batch(components):
    gen = torch.Generator().manual_seed(5)
    return {"pixel_values": torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1,
            "input_ids": torch.randint(0, 100, (2, components.tokenizer.model_max_length), generator=gen)}


def test_ip_noise_gamma_noises_the_input_with_a_fresh_perturbation_and_keeps_the_target(tmp_path):
    """kohya: noisy = add_noise(x0, noise + gamma * randn, t), drawn after the timesteps; target = noise."""
    components = lora_unet()
    batch = demo_batch(components)
    gen = torch.Generator().manual_seed(0)
    plain = make_step_inputs(batch, components, tiny_config(tmp_path), torch.float32, gen)
    perturbation = torch.randn(plain.x0.shape, generator=gen)  # the draw that follows the timesteps
    s = make_step_inputs(batch, components, tiny_config(tmp_path, ip_noise_gamma=0.1), torch.float32,
                         torch.Generator().manual_seed(0))
    assert torch.equal(s.noise, plain.noise) and torch.equal(s.target, plain.noise)
    assert torch.equal(s.timesteps, plain.timesteps)
    expected = components.noise_scheduler.add_noise(plain.x0, plain.noise + 0.1 * perturbation, plain.timesteps)
    torch.testing.assert_close(s.noisy, expected)
    assert not torch.allclose(s.noisy, plain.noisy)


def test_multires_noise_reaches_the_step_and_is_deterministic(tmp_path):
    components = lora_unet()
    batch = demo_batch(components)
    config = tiny_config(tmp_path, multires_noise_iterations=4, multires_noise_discount=0.5)
    s = make_step_inputs(batch, components, config, torch.float32, torch.Generator().manual_seed(0))
    again = make_step_inputs(batch, components, config, torch.float32, torch.Generator().manual_seed(0))
    plain = make_step_inputs(batch, components, tiny_config(tmp_path), torch.float32, torch.Generator().manual_seed(0))
    assert torch.equal(s.noise, again.noise) and torch.equal(s.noisy, again.noisy)
    assert torch.equal(s.x0, plain.x0) and not torch.allclose(s.noise, plain.noise)
    assert s.noise.std().item() == pytest.approx(1.0, abs=1e-5) and torch.equal(s.target, s.noise)
    torch.testing.assert_close(s.noisy, components.noise_scheduler.add_noise(s.x0, s.noise, s.timesteps))


# ----------------------------------------------------------------------------- flags and exports


@pytest.mark.parametrize("flags, fragment", [
    (["--loss_type", "l3"], "--loss_type: invalid choice"),
    (["--huber_schedule", "linear"], "--huber_schedule: invalid choice"),
    (["--loss_type", "huber", "--huber_c", "0"], "--huber_c must be > 0"),
    (["--loss_type", "smooth_l1", "--huber_scale", "-1"], "--huber_scale must be > 0"),
    (["--huber_c", "0.2"], "--huber_c shapes the huber and smooth_l1 losses"),
    (["--loss_type", "l1", "--huber_schedule", "constant"], "--huber_schedule shapes"),
    (["--multires_noise_iterations", "-1"], "--multires_noise_iterations must be >= 0"),
    (["--multires_noise_discount", "0.5"], "give that too"),
    (["--multires_noise_iterations", "6", "--multires_noise_discount", "0"], "--multires_noise_discount must be > 0"),
    (["--ip_noise_gamma", "-0.1"], "--ip_noise_gamma must be >= 0"),
])
def test_bad_loss_and_noise_flags_stop_in_one_line_before_models_load(tmp_path, capsys, monkeypatch, flags, fragment):
    import sat_train.demo

    monkeypatch.setattr(sat_train.demo, "build_components", lambda: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as exit_info:
        main([*flags, "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and fragment in err, err


def test_kohya_metadata_records_the_loss_and_noise_options(tmp_path):
    """The ss_* keys and value forms sd-scripts' train_network.py writes (str() of each setting)."""
    from sat_train.models.family import SD15

    config = tiny_config(tmp_path, loss_type="huber", huber_schedule="exponential", huber_c=0.2, huber_scale=2.0,
                         debiased_estimation_loss=True, multires_noise_iterations=6, ip_noise_gamma=0.1)
    got = kohya_training_metadata(config, 2, 1, 2, SD15())
    assert {k: got[k] for k in ("ss_loss_type", "ss_huber_schedule", "ss_huber_c", "ss_huber_scale",
                                "ss_debiased_estimation", "ss_multires_noise_iterations",
                                "ss_multires_noise_discount", "ss_ip_noise_gamma")} == {
        "ss_loss_type": "huber", "ss_huber_schedule": "exponential", "ss_huber_c": "0.2", "ss_huber_scale": "2.0",
        "ss_debiased_estimation": "True", "ss_multires_noise_iterations": "6", "ss_multires_noise_discount": "0.3",
        "ss_ip_noise_gamma": "0.1"}
    defaults = kohya_training_metadata(tiny_config(tmp_path), 2, 1, 2, SD15())
    assert (defaults["ss_loss_type"], defaults["ss_debiased_estimation"], defaults["ss_multires_noise_iterations"],
            defaults["ss_ip_noise_gamma"]) == ("l2", "False", "None", "None")


def test_a_run_with_every_option_trains_and_exports_them(tmp_path):
    """The flags reach the run: a 2-step demo run under SAC trains another LoRA than the default loss and noise,
    and its kohya file says how."""
    def run(name, *flags):
        out = tmp_path / name
        main(["--guide", "sac", "--resolution", "64", "--max_train_steps", "2", "--train_batch_size", "2",
              "--output_dir", str(out), "--seed", "0", "--report_to", "none", "--export_format", "kohya",
              "--snr_gamma", "5", "--mask_preview_steps", "1000", *flags])
        with safe_open(str(out / "pytorch_lora_weights_kohya.safetensors"), "pt") as f:
            return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

    meta, lora = run("options", "--loss_type", "smooth_l1", "--huber_schedule", "snr", "--debiased_estimation_loss",
                     "--multires_noise_iterations", "3", "--ip_noise_gamma", "0.1")
    _, default = run("default")
    assert all(torch.isfinite(v).all() for v in lora.values())
    assert any(not torch.equal(v, default[k]) for k, v in lora.items() if "lora_up" in k)
    assert (meta["ss_loss_type"], meta["ss_debiased_estimation"], meta["ss_multires_noise_iterations"]) == (
        "smooth_l1", "True", "3")


def test_resume_with_every_option_matches_the_uninterrupted_run(tmp_path):
    """The noise options draw from the step's generator only, and the loss holds no state: a resumed run ends
    with the uninterrupted run's LoRA, bit for bit."""
    from safetensors.torch import load_file

    from sat_train import train

    options = dict(guide="sac", loss_type="huber", huber_schedule="exponential", debiased_estimation_loss=True,
                   snr_gamma=5.0, multires_noise_iterations=3, multires_noise_discount=0.5, ip_noise_gamma=0.1)
    straight = train(tiny_config(tmp_path / "straight", max_train_steps=4, **options))
    interrupted = tmp_path / "resumed"
    train(tiny_config(interrupted, max_train_steps=2, checkpointing_steps=2, **options))
    resumed = train(tiny_config(interrupted, max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest",
                                **options))
    expected, got = load_file(straight), load_file(resumed)
    assert expected.keys() == got.keys() and len(expected) > 0
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_kohya_min_snr_gamma_spelling_sets_snr_gamma():
    from sat_train.cli import parse_config

    assert parse_config(["--min_snr_gamma", "5", "--max_train_steps", "1"]).snr_gamma == 5.0
    assert parse_config(["--max_train_steps", "1"]).snr_gamma is None
