"""One module per fused Triton operation: kernel(s), launcher, autograd.Function (Liger-Kernel style).

Launchers take arguments already checked by ``sat_kernels.functional``.
"""
