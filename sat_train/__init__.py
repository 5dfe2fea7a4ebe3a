"""sat_train: LoRA fine-tuning of Stable Diffusion v1.5 with SAT guidance (see DESIGN.md).

Run ``python -m sat_train --help``; with no model and no data it trains an embedded tiny demo
model offline on bundled photos.
"""

from .config import GuideSettings, TrainConfig, UsageError

__all__ = ["GuideSettings", "TrainConfig", "UsageError", "caption_token_positions", "guided_prediction", "install_sat_capture",
           "train"]
_DROPIN = ("caption_token_positions", "guided_prediction", "install_sat_capture")


def __getattr__(name):  # the drop-in helpers (sat_train.dropin), imported on first use
    if name in _DROPIN:
        from . import dropin

        return getattr(dropin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def train(config: TrainConfig):
    """Runs one training job (see sat_train.train.train); imported lazily to keep import cheap."""
    from .train import train as _train

    return _train(config)
