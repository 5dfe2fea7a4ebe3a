"""inductor on CPU returns zero input gradients for a small conv block (torch 2.13.0 CPU).

Found shrinking the wrong LoRA gradients of a compiled tiny SD UNet (benchmarks/RESULTS.md,
"The inductor gap"): diffusers' ResnetBlock2D followed by Upsample2D, written out here in plain
torch. Eager and aot_eager_decomp_partition agree; inductor's forward is right but the backward
gives exactly 0 for x, when the weights are frozen (requires_grad=False, as a LoRA run's base
weights are; with trainable weights the gradients are right). Each of these made it go away in
our runs: no GroupNorm+SiLU pre-activations, no division of the residual sum by 1.0
(ResnetBlock2D's output_scale_factor), no upsample + conv after the block (diffusers' modules), or
``torch._inductor.config.layout_optimization = False`` (inductor's channels-last conversion of
the conv graph). Run: ``python benchmarks/inductor_gap_repro.py`` (about a minute).
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn


def block(norm1, conv1, norm2, conv2, shortcut, conv_up):
    def f(x):
        h = conv2(F.silu(norm2(conv1(F.silu(norm1(x))))))
        y = (shortcut(x) + h) / 1.0  # ResnetBlock2D's output_scale_factor
        return conv_up(F.interpolate(y, scale_factor=2.0, mode="nearest")).pow(2).mean()  # Upsample2D
    return f


def max_input_gradient(f, x, backend=None):
    torch._dynamo.reset()
    x = x.detach().requires_grad_()
    (grad,) = torch.autograd.grad((torch.compile(f, backend=backend) if backend else f)(x), x)
    return grad.abs().max().item()


if __name__ == "__main__":
    torch.manual_seed(0)
    modules = [nn.GroupNorm(8, 48), nn.Conv2d(48, 32, 3, padding=1), nn.GroupNorm(8, 32),
               nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(48, 32, 1), nn.Conv2d(32, 32, 3, padding=1)]
    f = block(*(m.requires_grad_(False) for m in modules))  # frozen, as a LoRA run's base weights
    x = torch.randn(2, 48, 8, 4)
    eager, inductor = max_input_gradient(f, x), max_input_gradient(f, x, "inductor")
    torch._inductor.config.layout_optimization = False
    workaround = max_input_gradient(f, x, "inductor")
    print(f"torch {torch.__version__}: max|dL/dx| eager {eager:.3g}, inductor {inductor:.3g}, "
          f"inductor with layout_optimization=False {workaround:.3g}")
    sys.exit(0 if inductor == 0 < eager else 1)  # 0 = the bug is there
