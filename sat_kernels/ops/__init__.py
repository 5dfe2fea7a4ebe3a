"""One module per fused Triton operation: kernel(s), launcher, autograd.Function (Liger-Kernel style).

Launchers take arguments already checked by ``sat_kernels.functional``.
"""


def cdiv(a: int, b: int) -> int:
    """triton.cdiv in plain ints: Triton 3.9 wraps its helper as a constexpr function that costs
    ~5 us per host call, and the launchers do this arithmetic on every call."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """triton.next_power_of_2 in plain ints (see cdiv): the smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()
