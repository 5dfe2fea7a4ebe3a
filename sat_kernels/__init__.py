"""sat_kernels: fused Triton kernels (and their torch references) for SAT attention-guided degradation.

Public API (see DESIGN.md): attention_mass, attention_mass_from_qk, token_attention_probs,
gaussian_blur, degrade_latents, saliency_mask. Each takes backend="auto" | "triton" | "torch".
"""

from .functional import (
    attention_mass,
    attention_mass_from_qk,
    degrade_latents,
    gaussian_blur,
    saliency_mask,
    token_attention_probs,
)

__version__ = "0.1.0"

__all__ = [
    "attention_mass",
    "attention_mass_from_qk",
    "degrade_latents",
    "gaussian_blur",
    "saliency_mask",
    "token_attention_probs",
]
