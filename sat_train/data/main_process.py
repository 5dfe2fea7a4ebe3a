"""Work the main process does alone for every process of a multi-process run (the data check, the
--cache_latents_to_disk files), its result or its failure handed to the others.

``from_main_process`` runs the work on the main process only, then every process meets at one collective
(accelerate's ``broadcast_object_list``) carrying "ok, result" or "failed, one line", whether the work
succeeded or not. A failure then stops every process with a one-line error: the main process re-raises its
own, the others raise the same UsageError when it is one (every process would have met it: the CLI prints
it once), else RuntimeError naming it (FAILED_WHILE). Without that collective the others would wait at a
barrier for the main process: for ever (NCCL, or until its timeout) or until gloo reports the lost peer
in words that do not name the cause.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from ..errors import UsageError

T = TypeVar("T")
FAILED_WHILE = "the main process failed while {doing}: {error}; see its error"


def one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (as the CLI shows an unexpected error)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def from_main_process(accelerator, doing: str, work: Callable[[], T]) -> T:
    """``work()`` run on the main process, its (picklable) result returned on every process; ``doing``
    names the work in the others' error ("caching latents"). One process (or an accelerator stand-in
    without ``num_processes``): simply ``work()``."""
    if getattr(accelerator, "num_processes", 1) == 1:
        return work()
    from accelerate.utils import broadcast_object_list

    message: list = [None]
    failure = None
    if accelerator.is_main_process:
        try:
            message = [("ok", work())]
        except Exception as err:  # anything: an unreadable image, an OOM, a full disk; re-raised below
            failure = err
            message = [("usage", str(err)) if isinstance(err, UsageError) else ("failed", one_line(err))]
    outcome, payload = broadcast_object_list(message)[0]
    if failure is not None:
        raise failure
    if outcome == "usage":
        raise UsageError(payload)
    if outcome == "failed":
        raise RuntimeError(FAILED_WHILE.format(doing=doing, error=payload))
    return payload
