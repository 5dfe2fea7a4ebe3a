"""Random streams derived from (seed, keys): the same keys always give the same draws.

A step's noise depends on (seed, process, step, micro-batch) and a sample's augmentation on
(seed, epoch, index), never on how many draws came before. That is what makes a resumed run
(or one with prefetching or worker processes) reproduce an uninterrupted one, with no random
state to checkpoint. LoRA dropout draws from torch's global generator, so a step's forward runs
under ``seeded_global_rng`` keyed the same way.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch


def derived_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


@contextlib.contextmanager
def seeded_global_rng(*keys: int, device: torch.device | str = "cpu"):
    """Inside: torch's global generators (CPU, and ``device``'s when it is a GPU), which nn.Dropout
    draws from, seeded from ``keys``; after: exactly as before, so nothing else sees a change."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if on_gpu else None
    seed = derived_generator(*keys).initial_seed()
    with torch.random.fork_rng(devices=[index] if on_gpu else []):
        torch.default_generator.manual_seed(seed)
        if on_gpu:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
