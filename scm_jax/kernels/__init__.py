"""Pallas kernels: the fused attention forward + JVP (TPU Mosaic, GPU Triton, CPU interpret)."""
from scm_jax.kernels.flash_jvp import (BACKENDS, BlockSizes, attention_jvp, default_backend,
                                       reference_attention, reference_attention_jvp,
                                       sharded_attention_jvp)

__all__ = ["BACKENDS", "BlockSizes", "attention_jvp", "default_backend", "reference_attention",
           "reference_attention_jvp", "sharded_attention_jvp"]
