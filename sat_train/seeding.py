"""Random streams derived from (seed, keys): the same keys always give the same draws.

A step's noise depends on (seed, process, step, micro-batch) and a sample's augmentation on
(seed, epoch, index), never on how many draws came before. That is what makes a resumed run
(or one with prefetching or worker processes) reproduce an uninterrupted one, with no random
state to checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch


def derived_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)
