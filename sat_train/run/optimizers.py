"""The optimizer and the lr schedule: --optimizer and --optimizer_args (the class, optional packages
imported on use, and its keyword arguments, checked against what the class takes), the param groups
(the UNet's LoRA, each trained text encoder's at --text_encoder_lr) and --lr_scheduler. Imports no
torch at module level: the flags read OPTIMIZERS and LR_SCHEDULERS."""

from __future__ import annotations

import ast
import importlib
import inspect
import math
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    from ..config.settings import TrainConfig

# --optimizer → (module, class, pip command when the module is missing); adamw and adafactor are torch's own
_OPTIMIZER_CLASSES = {
    "adamw": ("torch.optim", "AdamW", None),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "pip install bitsandbytes  (or: pip install sat[bnb])"),
    "prodigy": ("prodigyopt", "Prodigy", "pip install prodigyopt  (or: pip install sat[prodigy])"),
    "lion": ("lion_pytorch", "Lion", "pip install lion-pytorch  (or: pip install sat[lion])"),
    # torch's Adafactor (torch >= 2.5), not transformers': it follows --learning_rate and the lr schedule,
    # where transformers' default relative_step=True computes its own lr and ignores both
    "adafactor": ("torch.optim", "Adafactor", None),
}
OPTIMIZERS = tuple(_OPTIMIZER_CLASSES)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def optimizer_kwargs(config: TrainConfig) -> dict:
    """The optimizer's keyword arguments except lr: the --adam_* flags for adamw/adamw8bit, then
    --optimizer_args (which override them)."""
    name = config.optimizer_name
    given = parse_optimizer_args(config.optimizer_args)
    accepted = _keyword_names(optimizer_class(name))
    if "lr" in given:
        raise UsageError("--optimizer_args lr=...: give the learning rate as --learning_rate (the lr schedule "
                         "and --scale_lr act on it)")
    unknown = sorted(k for k in given if accepted is not None and k not in accepted)
    if unknown:
        takes = ", ".join(sorted(accepted - {"params", "lr"}))
        raise UsageError(f"--optimizer_args: {name} takes no argument {', '.join(unknown)}; it takes: {takes}")
    kwargs = {}
    if name in ("adamw", "adamw8bit"):
        kwargs = dict(betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
                      eps=config.adam_epsilon)
    return {**kwargs, **given}


def parse_optimizer_args(items) -> dict:
    """--optimizer_args key=value ... → {key: value}; a value is a Python literal where it reads as one
    (0.01, True, (0.9,0.99), None), else the string itself (as kohya's --optimizer_args)."""
    parsed = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"--optimizer_args item {item!r} is not key=value: write e.g. weight_decay=0.01")
        if key in parsed:
            raise UsageError(f"--optimizer_args gives {key} twice: keep one")
        try:
            parsed[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            parsed[key] = text.strip()
    return parsed


def optimizer_class(name: str):
    """The class of --optimizer ``name``, imported; a missing optional package is a UsageError naming the
    pip command."""
    module_name, class_name, pip_command = _OPTIMIZER_CLASSES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise UsageError(f"--optimizer {name} needs {module_name.split('.')[0]}: {pip_command}") from None
    if not hasattr(module, class_name):  # torch.optim.Adafactor arrived in torch 2.5
        raise UsageError(f"--optimizer {name} needs {module_name}.{class_name}: upgrade, e.g. pip install -U "
                         f"{'torch' if module_name.startswith('torch') else module_name.split('.')[0]}")
    return getattr(module, class_name)


def _keyword_names(cls) -> set[str] | None:
    """The keyword arguments ``cls`` takes, or None when it takes **kwargs (then any key may be right)."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.name != "self"}


def build_optimizer(config: TrainConfig, params, lr: float):
    """--optimizer with its arguments on ``params``; a value the optimizer refuses is a UsageError."""
    name = config.optimizer_name
    try:
        return optimizer_class(name)(params, lr=lr, **optimizer_kwargs(config))
    except (TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        flags = "--optimizer_args" + (" or the --adam_* flags" if name in ("adamw", "adamw8bit") else "")
        raise UsageError(f"--optimizer {name}: {first} (check {flags})") from None


def check_optimizer_flags(config) -> None:
    if config.lr_num_cycles < 1:
        raise UsageError(f"--lr_num_cycles must be >= 1, got {config.lr_num_cycles}")
    if not 0.0 < config.lr_power < float("inf"):  # also rejects nan
        raise UsageError(f"--lr_power must be > 0, got {config.lr_power}")
    # the optimizer built on a one-element parameter: a missing package, a bad --optimizer_args item,
    # key or value fails here, before any model loads
    import torch

    build_optimizer(config, [torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)


def check_text_encoder_flags(config) -> None:
    """--text_encoder_lr only means something with --train_text_encoder, and must be a positive number."""
    if config.text_encoder_lr is None:
        return
    if not config.train_text_encoder:
        raise UsageError("--text_encoder_lr sets the text encoder LoRA's learning rate: add --train_text_encoder, "
                         "or drop --text_encoder_lr")
    if not 0.0 < config.text_encoder_lr < float("inf"):  # also rejects nan
        raise UsageError(f"--text_encoder_lr must be > 0, got {config.text_encoder_lr}; leave it out to use "
                         "--learning_rate")


def text_encoder_learning_rate(config: TrainConfig) -> float:
    """--text_encoder_lr, or the UNet's --learning_rate when it is unset."""
    return config.learning_rate if config.text_encoder_lr is None else config.text_encoder_lr


def optimizer_param_groups(config: TrainConfig, unet_params, text_encoder_params=(), lr_scale: float = 1.0) -> list:
    """The optimizer's groups: the UNet's LoRA at --learning_rate, then each trained text encoder's
    (``text_encoder_params``: one list per encoder, in the family's order) at --text_encoder_lr;
    ``lr_scale`` (--scale_lr) multiplies all. The lr schedule scales every group."""
    groups = [{"params": list(unet_params), "lr": config.learning_rate * lr_scale}]
    for params in text_encoder_params:
        if params:
            groups.append({"params": list(params), "lr": text_encoder_learning_rate(config) * lr_scale})
    return groups


def make_optimizer(config: TrainConfig, params):
    """--optimizer (or --use_8bit_adam) on ``params`` at --learning_rate, with its arguments
    (optimizer_kwargs: the --adam_* flags for the AdamWs, then --optimizer_args)."""
    return build_optimizer(config, params, lr=config.learning_rate)


def make_scaled_optimizer(config: TrainConfig, params, num_processes: int, text_encoder_params=()):
    """The optimizer and the UNet's learning rate (--scale_lr: times accumulation x batch x processes);
    with ``text_encoder_params`` (a list per trained text encoder), a param group each at
    --text_encoder_lr, scaled alike."""
    scale = config.gradient_accumulation_steps * config.train_batch_size * num_processes if config.scale_lr else 1
    optimizer = make_optimizer(config, optimizer_param_groups(config, params, text_encoder_params, lr_scale=scale))
    return optimizer, optimizer.param_groups[0]["lr"]


def make_lr_scheduler(config: TrainConfig, optimizer, batches: int, num_processes: int):
    """The lr schedule and the run's length in optimizer steps. As in diffusers' example, warmup and
    total steps are multiplied by the processes: accelerate's prepared scheduler advances that many
    steps per optimizer step."""
    from diffusers.optimization import get_scheduler

    batches_per_process = math.ceil(batches / num_processes)
    steps_per_epoch = math.ceil(batches_per_process / config.gradient_accumulation_steps)
    max_train_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * num_processes,
                                 num_training_steps=max_train_steps * num_processes,
                                 num_cycles=config.lr_num_cycles, power=config.lr_power)
    return lr_scheduler, max_train_steps
