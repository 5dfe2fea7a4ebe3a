"""--optimizer and --optimizer_args: the optimizer class (optional packages imported on use) and
its keyword arguments, checked against what the class takes."""

from __future__ import annotations

import ast
import importlib
import inspect

from .config import TrainConfig, UsageError

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
