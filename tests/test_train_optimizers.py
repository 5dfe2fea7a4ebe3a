"""--optimizer / --optimizer_args / --use_8bit_adam and --lr_num_cycles / --lr_power."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from safetensors.torch import load_file

from sat_train.cli import main, parse_config
from sat_train.errors import UsageError
from sat_train.run.optimizers import parse_optimizer_args
from sat_train import train
from sat_train.run.optimizers import make_lr_scheduler, make_optimizer, make_scaled_optimizer
from train_helpers import assert_same_tensors, tiny_config

import sat_train.demo
import sat_train.run.prepare as prepare_module


def tiny_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3, 4, generator=gen)), torch.nn.Parameter(torch.randn(5, generator=gen))]


def take_steps(optimizer, params, steps: int = 3) -> None:
    """The same made-up gradients at each step for both optimizers under comparison."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
        optimizer.zero_grad()


def lion_class():
    return pytest.importorskip("lion_pytorch").Lion


def prodigy_class():
    return pytest.importorskip("prodigyopt").Prodigy


# flags → the optimizer the test builds itself with the arguments those flags mean
CASES = {
    "adamw": (["--adam_beta1", "0.8", "--adam_weight_decay", "0.1", "--adam_epsilon", "1e-6"],
              lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.8, 0.999), weight_decay=0.1, eps=1e-6)),
    "adamw_args_override": (["--adam_beta1", "0.8", "--optimizer_args", "betas=(0.7,0.95)", "amsgrad=True"],
                            lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.7, 0.95), weight_decay=1e-2, eps=1e-8,
                                                        amsgrad=True)),
    "adafactor": (["--optimizer", "adafactor", "--optimizer_args", "beta2_decay=-0.5", "eps=(None,1e-4)",
                   "weight_decay=0.01"],
                  lambda p: torch.optim.Adafactor(p, lr=1e-3, beta2_decay=-0.5, eps=(None, 1e-4), weight_decay=0.01)),
    "lion": (["--optimizer", "lion", "--optimizer_args", "betas=(0.95,0.98)", "weight_decay=0.1"],
             lambda p: lion_class()(p, lr=1e-3, betas=(0.95, 0.98), weight_decay=0.1)),
    # Prodigy estimates the step size itself: lr is a multiplier, 1.0 as its authors advise
    "prodigy": (["--optimizer", "prodigy", "--optimizer_args", "d_coef=2", "d0=1e-3", "safeguard_warmup=True",
                 "--learning_rate", "1.0"],
                lambda p: prodigy_class()(p, lr=1.0, d_coef=2.0, d0=1e-3, safeguard_warmup=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_optimizer_steps_as_the_one_built_directly(case, tmp_path):
    flags, build_reference = CASES[case]
    if case in ("lion", "prodigy"):
        build_reference([torch.nn.Parameter(torch.zeros(1))])  # skips when the package is not installed
    config = parse_config(["--learning_rate", "1e-3", *flags, "--output_dir", str(tmp_path)])
    ours, theirs = tiny_params(), tiny_params()
    optimizer = make_optimizer(config, ours)
    reference = build_reference(theirs)
    assert type(optimizer) is type(reference)
    take_steps(optimizer, ours)
    take_steps(reference, theirs)
    for got, expected in zip(ours, theirs):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(ours[0], tiny_params()[0])  # the steps did move the parameters


def test_scale_lr_applies_to_the_chosen_optimizer(tmp_path):
    config = parse_config(["--optimizer", "adafactor", "--scale_lr", "--learning_rate", "1e-3",
                           "--train_batch_size", "2", "--output_dir", str(tmp_path)])
    optimizer, learning_rate = make_scaled_optimizer(config, tiny_params(), num_processes=3)
    assert isinstance(optimizer, torch.optim.Adafactor)
    assert learning_rate == pytest.approx(1e-3 * 2 * 3) and optimizer.param_groups[0]["lr"] == learning_rate


def test_optimizer_args_parsing():
    parsed = parse_optimizer_args(["weight_decay=0.01", "betas=(0.9,0.99)", "amsgrad=True", "eps=(None, 1e-3)",
                                   "d0=-1e-6", "slice_p=11", "mode=fast", "name= spaced ", "empty=", "note=a=b"])
    assert parsed == {"weight_decay": 0.01, "betas": (0.9, 0.99), "amsgrad": True, "eps": (None, 1e-3),
                      "d0": -1e-6, "slice_p": 11, "mode": "fast", "name": "spaced", "empty": "", "note": "a=b"}
    assert type(parsed["slice_p"]) is int and type(parsed["amsgrad"]) is bool
    for bad in (["weight_decay"], ["=0.1"], ["1x=2"], ["a b=1"], ["lr=1", "lr=2"]):
        with pytest.raises(UsageError, match="--optimizer_args"):
            parse_optimizer_args(bad)


def one_line_error(capsys, argv, code=2) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sat-train: error:"), err
    return err


@pytest.mark.parametrize("argv, fragments", [
    (["--optimizer_args", "weight_decay"], ["--optimizer_args", "'weight_decay'", "key=value"]),
    (["--optimizer", "adafactor", "--optimizer_args", "betas=(0.9,0.99)"],
     ["--optimizer_args", "adafactor takes no argument betas", "beta2_decay"]),
    (["--optimizer_args", "momentum=0.9"], ["adamw takes no argument momentum", "amsgrad"]),
    (["--optimizer_args", "lr=0.1"], ["--optimizer_args lr=", "--learning_rate"]),
    (["--optimizer", "adafactor", "--optimizer_args", "eps=abc"], ["--optimizer adafactor", "--optimizer_args"]),
    (["--adam_beta1", "1.5"], ["--optimizer adamw", "beta", "--adam_*"]),
    (["--optimizer", "rmsprop"], ["--optimizer", "rmsprop"]),
    (["--lr_num_cycles", "0"], ["--lr_num_cycles must be >= 1"]),
    (["--lr_power", "0"], ["--lr_power must be > 0"]),
    (["--use_8bit_adam", "--optimizer", "lion"], ["--use_8bit_adam", "--optimizer lion"]),
])
def test_bad_optimizer_flags_are_one_line_usage_errors(argv, fragments, tmp_path, capsys, monkeypatch):
    def no_models(*args, **kwargs):
        raise AssertionError("models loaded before the flags were checked")

    monkeypatch.setattr(prepare_module, "load_components", no_models)
    monkeypatch.setattr(sat_train.demo, "build_components", no_models)
    err = one_line_error(capsys, [*argv, "--output_dir", str(tmp_path)])
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("argv, name, modules, pip_command", [
    (["--optimizer", "prodigy"], "prodigy", ["prodigyopt"], "pip install prodigyopt"),
    (["--optimizer", "lion"], "lion", ["lion_pytorch"], "pip install lion-pytorch"),
    (["--optimizer", "adamw8bit"], "adamw8bit", ["bitsandbytes", "bitsandbytes.optim"], "pip install bitsandbytes"),
    (["--use_8bit_adam"], "adamw8bit", ["bitsandbytes", "bitsandbytes.optim"], "pip install bitsandbytes"),
])
def test_missing_optimizer_package_names_the_pip_command(argv, name, modules, pip_command, tmp_path, capsys,
                                                         monkeypatch):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    err = one_line_error(capsys, [*argv, "--output_dir", str(tmp_path)])
    assert pip_command in err and f"--optimizer {name} needs" in err


def test_use_8bit_adam_is_an_alias_of_adamw8bit(tmp_path):
    plain = parse_config(["--output_dir", str(tmp_path)])
    assert plain.optimizer_name == "adamw"
    for argv in (["--use_8bit_adam"], ["--use_8bit_adam", "--optimizer", "adamw8bit"], ["--optimizer", "adamw8bit"]):
        pytest.importorskip("bitsandbytes")
        assert parse_config([*argv, "--output_dir", str(tmp_path)]).optimizer_name == "adamw8bit"


def test_use_8bit_adam_alias_without_bitsandbytes(tmp_path, monkeypatch):
    # the alias resolves to adamw8bit (so it asks for bitsandbytes) even where bitsandbytes is missing
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    for argv in (["--use_8bit_adam"], ["--use_8bit_adam", "--optimizer", "adamw"]):
        with pytest.raises(UsageError, match="--optimizer adamw8bit needs bitsandbytes"):
            parse_config([*argv, "--output_dir", str(tmp_path)])


def warmup_then(factor):
    """diffusers' schedules: linear warmup from 0, then ``factor(progress)`` of the base lr."""
    def lr_factor(step, warmup, total):
        if step < warmup:
            return step / warmup
        return factor((step - warmup) / (total - warmup))
    return lr_factor


LR_END = 1e-7  # diffusers' polynomial schedule decays to this absolute lr


@pytest.mark.parametrize("flags, lr_factor", [
    (["--lr_scheduler", "cosine_with_restarts", "--lr_num_cycles", "3"],
     warmup_then(lambda t: 0.0 if t >= 1 else 0.5 * (1 + math.cos(math.pi * ((3 * t) % 1.0))))),
    (["--lr_scheduler", "cosine_with_restarts"],  # the default: one cycle, i.e. plain cosine
     warmup_then(lambda t: 0.0 if t >= 1 else 0.5 * (1 + math.cos(math.pi * t)))),
    (["--lr_scheduler", "polynomial", "--lr_power", "2.5"],
     warmup_then(lambda t: ((1e-2 - LR_END) * (1 - min(t, 1.0)) ** 2.5 + LR_END) / 1e-2)),
    (["--lr_scheduler", "polynomial"],  # the default power 1: linear down to LR_END
     warmup_then(lambda t: ((1e-2 - LR_END) * (1 - min(t, 1.0)) + LR_END) / 1e-2)),
])
def test_lr_schedule_follows_num_cycles_and_power(flags, lr_factor, tmp_path):
    config = parse_config([*flags, "--learning_rate", "1e-2", "--lr_warmup_steps", "2", "--max_train_steps", "12",
                           "--output_dir", str(tmp_path)])
    optimizer = make_optimizer(config, tiny_params())
    scheduler, max_train_steps = make_lr_scheduler(config, optimizer, batches=100, num_processes=1)
    assert max_train_steps == 12
    got = []
    for _ in range(13):
        got.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    expected = [1e-2 * lr_factor(step, 2, 12) for step in range(13)]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_train_runs_with_adafactor(tmp_path):
    config = tiny_config(tmp_path / "adafactor", optimizer="adafactor", optimizer_args=("beta2_decay=-0.6",))
    run = prepare_module.prepare_run(config)
    built = getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate wraps the optimizer
    assert isinstance(built, torch.optim.Adafactor) and built.defaults["beta2_decay"] == -0.6
    run.accelerator.end_training()
    lora = load_file(train(config))
    assert lora and all(torch.isfinite(t).all() for t in lora.values())
    # LoRA's B starts at zero: the adafactor steps moved it
    assert any(t.abs().sum() > 0 for k, t in lora.items() if "lora_B" in k or "lora.up" in k)


def test_resume_with_adafactor_matches_uninterrupted_run(tmp_path):
    settings = dict(optimizer="adafactor", optimizer_args=("weight_decay=0.01",))
    straight = train(tiny_config(tmp_path / "straight", max_train_steps=4, **settings))
    interrupted = tmp_path / "resumed"
    train(tiny_config(interrupted, max_train_steps=2, checkpointing_steps=2, **settings))
    assert (interrupted / "checkpoint-2").is_dir()  # step 2 of 3 in the first epoch: resume is mid-epoch
    resumed = train(tiny_config(interrupted, max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest",
                                **settings))
    expected, got = load_file(straight), load_file(resumed)
    assert_same_tensors(got, expected)


@pytest.mark.parametrize("first, then", [("adafactor", "adamw"), ("adamw", "lion")])
def test_resume_under_another_optimizer_is_refused(first, then, tmp_path):
    if "lion" in (first, then):
        lion_class()
    train(tiny_config(tmp_path, max_train_steps=2, checkpointing_steps=2, optimizer=first))
    # the saved optimizer state belongs to another algorithm: loading it would crash or train wrongly
    with pytest.raises(UsageError, match=f"checkpoint-2 was saved by another optimizer.*--optimizer {then}"):
        train(tiny_config(tmp_path, max_train_steps=4, checkpointing_steps=2, optimizer=then,
                          resume_from_checkpoint="latest"))
