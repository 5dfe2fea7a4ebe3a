"""The command line's flags, built from TrainConfig's fields (their help, choices, argparse types and
aliases live in the field metadata, config/settings.py)."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from .settings import TrainConfig


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (not the 40-line usage) and exits with code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(parser_class=_OneLineErrorParser) -> argparse.ArgumentParser:
    parser = parser_class(
        prog="sat-train",
        description="LoRA fine-tuning of Stable Diffusion v1.5 and SDXL with SAT (self-attention control) guidance. "
        "With no --pretrained_model_name_or_path and no data flags it trains a tiny embedded demo model "
        "offline on bundled photos.",
        argument_default=argparse.SUPPRESS,  # only flags the user gave reach the namespace
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        help_text = f"{meta.pop('help')} (default: {f.default})"
        names = (f"--{f.name}", *meta.pop("aliases", ()))  # an alias keeps an older flag name working
        if hints[f.name] is bool:
            parser.add_argument(*names, dest=f.name, action="store_true", help=help_text)
        else:
            meta.setdefault("type", str)
            parser.add_argument(*names, dest=f.name, help=help_text, **meta)
    return parser
