"""Blackwell recipe: NVFP4 GEMMs. Native on sm_100/sm_120; on sm_89/sm_90 and the CPU the same recipe
builds the exact emulation (passes/lower_nvfp4.py), a quality preview of the Blackwell engine."""

import dataclasses

from fluxc.numerics import NVFP4_SEGMENT_SQNR_DB
from fluxc.recipes.base import Precision
from fluxc.recipes.generic import bf16
from fluxc.recipes.sm90 import QUANT_EXCLUDE, QUANT_WEIGHT_ONLY


def sm100_nvfp4():
    """Every block linear in NVFP4 (weights packed at build time, activations quantized per 16-element block
    at run time); the modulation GEMMs weight-only (their 3.2 B parameters in 4.5 bits: FLUX.1-dev's
    transformer fits 7 GB); the embedders, final projection, encoders and VAE in bf16, as for FP8."""
    return dataclasses.replace(bf16(), name="sm100_nvfp4", precision=Precision.NVFP4, quant_exclude=QUANT_EXCLUDE,
                               quant_weight_only=QUANT_WEIGHT_ONLY, check_rtol=10 ** (-NVFP4_SEGMENT_SQNR_DB / 20))
