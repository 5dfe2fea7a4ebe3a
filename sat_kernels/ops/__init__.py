"""One module per fused Triton operation: kernel(s), launcher, autograd.Function (Liger-Kernel style);
what several of them share is in ``utils.py``.

Launchers take arguments already checked by ``sat_kernels.functional``.
"""
