"""The run's one-line stops. Every room raises these; the CLI prints them as one line (usage: exit 2;
a non-finite loss: exit 1). Imports nothing of sat_train, so any module may raise them."""


class UsageError(Exception):
    """A problem the user can fix (bad flag, bad data); the CLI prints it as one line, exit 2."""


class NonFiniteLossError(RuntimeError):
    """The loss (or the LoRA weights) became NaN/inf; the run stopped without saving (the CLI prints it as
    one line, exit 1)."""
