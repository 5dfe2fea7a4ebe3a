"""Command line: flags built from TrainConfig's fields → TrainConfig → train().

Entry points: ``python -m sat_train`` and the ``sat-train`` console script (sat_train.cli:main).
Errors the user can fix (UsageError) print as one line and exit with code 2; --debug shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from .config import TrainConfig, UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sat-train",
        description="LoRA fine-tuning of Stable Diffusion v1.5 with SAT (self-attention control) guidance. "
        "With no --pretrained_model_name_or_path and no data flags it trains a tiny embedded demo model "
        "offline on bundled photos.",
        argument_default=argparse.SUPPRESS,  # only flags the user gave reach the namespace
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        help_text = f"{meta.pop('help')} (default: {f.default})"
        if hints[f.name] is bool:
            parser.add_argument(f"--{f.name}", action="store_true", help=help_text)
        else:
            meta.setdefault("type", str)
            parser.add_argument(f"--{f.name}", help=help_text, **meta)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags → TrainConfig; in demo mode the demo's defaults fill the flags the user left out."""
    given = vars(build_parser().parse_args(argv))
    config = TrainConfig(**given)
    if config.is_demo:
        from .demo import demo_defaults

        config = dataclasses.replace(config, **{k: v for k, v in demo_defaults().items() if k not in given})
    return config.validate()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        config = parse_config(argv)
        from .train import train

        train(config)
    except UsageError as err:
        if debug:
            raise
        print(f"sat-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("sat-train: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
