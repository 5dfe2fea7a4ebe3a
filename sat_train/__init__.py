"""sat_train: LoRA fine-tuning of Stable Diffusion v1.5 and SDXL with SAT guidance (see DESIGN.md).

Run ``python -m sat_train --help``; with no model and no data it trains an embedded tiny demo
model offline on bundled photos. The house, by job (each room imports only the rooms below it):
``errors``, ``faults``, ``seeding`` < ``models`` < ``data`` < ``guide`` < ``outputs`` < ``evaluate`` < ``demo`` < ``run``
< ``config`` < ``cli``, ``sample``, ``compare``, ``kohya``.
"""

from .config.settings import TrainConfig
from .errors import UsageError
from .guide.settings import GuideSettings

__all__ = ["GuideSettings", "TrainConfig", "UsageError", "caption_token_positions", "guided_prediction", "install_sat_capture",
           "train"]
_DROPIN = ("caption_token_positions", "guided_prediction", "install_sat_capture")


def __getattr__(name):  # the drop-in helpers (sat_train.guide.dropin), imported on first use
    if name in _DROPIN:
        from .guide import dropin

        return getattr(dropin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def train(config: TrainConfig):
    """Runs one training job (sat_train.run.loop.train); imported on first use to keep import cheap."""
    from .run.loop import train as _train

    return _train(config)
