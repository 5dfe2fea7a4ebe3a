"""Command line: flags (config.flags, built from TrainConfig's fields) → TrainConfig → train().

Entry points: ``python -m sat_train`` and the ``sat-train`` console script (sat_train.cli:main).
Errors the user can fix (UsageError) print as one line and exit with code 2; --debug shows the
traceback instead.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from .config.flags import build_parser
from .config.settings import TrainConfig
from .errors import NonFiniteLossError, UsageError

# torchrun (and accelerate launch) end every process as soon as one of them exits; an error every process
# raises alike is printed by the main one, so the others wait this long before exiting (they are ended
# as soon as the main process has printed and exited)
MAIN_PROCESS_GRACE_S = 5.0


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags (over --config_file's settings) → TrainConfig; in demo mode the demo's defaults fill the
    settings the user left out."""
    given = vars(build_parser().parse_args(argv))
    if given.get("config_file"):
        from .config.file import config_file_settings

        given = {**config_file_settings(given["config_file"]), **given}
    if given.get("dataset_config"):
        from .config.dataset_config import say_dataset_config_notes

        say_dataset_config_notes(given)
    config = TrainConfig(**given)
    if config.is_demo:
        from .demo import demo_defaults

        config = dataclasses.replace(config, **{k: v for k, v in demo_defaults().items() if k not in given})
    return config.validate()


def _say_error(message: str, same_on_every_process: bool) -> None:
    """One line on stderr. Under torchrun/accelerate launch every process raises a usage error or a
    NaN-loss stop alike, so only the main one (RANK 0) prints those; any other error may be one
    process's own, so each prints it, naming its rank."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if same_on_every_process and rank != 0:
        time.sleep(MAIN_PROCESS_GRACE_S)  # exiting first would have the launcher end the main process unheard
        return
    prefix = f"[rank {rank}] " if world > 1 and not same_on_every_process else ""
    print(f"{prefix}sat-train: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        config = parse_config(argv)
        from .run.loop import train

        train(config)
    except UsageError as err:
        if debug:
            raise
        _say_error(str(err), same_on_every_process=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("sat-train: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # anything else: one line and exit 1; --debug shows the traceback
        if debug:
            raise
        if isinstance(err, NonFiniteLossError):
            _say_error(str(err), same_on_every_process=True)
        else:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            _say_error(f"{type(err).__name__}: {first} (run with --debug for the traceback)",
                       same_on_every_process=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
