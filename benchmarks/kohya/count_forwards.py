"""python count_forwards.py [sat_train.kohya's arguments]: the launcher, counting sd-scripts' UNet forwards
(with / without gradients); prints UNET_FORWARDS {...} at exit."""
import atexit
import sys

import library.original_unet as original_unet
import torch

from sat_train.kohya import main

forward = original_unet.UNet2DConditionModel.forward
counts = {"grad": 0, "no_grad": 0}


def counted(self, *args, **kwargs):
    counts["grad" if torch.is_grad_enabled() else "no_grad"] += 1
    return forward(self, *args, **kwargs)


original_unet.UNet2DConditionModel.forward = counted
atexit.register(lambda: print("UNET_FORWARDS", counts, file=sys.stderr))
main(sys.argv[1:])
