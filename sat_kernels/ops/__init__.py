"""One module per fused Triton operation: kernel(s), launcher, its ``torch.library`` op (fake
implementation, and autograd where differentiable; Liger-Kernel style);
what several of them share is in ``utils.py``.

Launchers take arguments already checked by ``sat_kernels.functional``.
"""
