"""Hopper (and Ada) recipes: FP8 GEMMs on sm_89+ (the CPU target runs them too, for tests)."""

import dataclasses

from fluxc.numerics import FP8_ATTENTION_SEGMENT_SQNR_DB, FP8_SEGMENT_SQNR_DB
from fluxc.recipes.base import Precision
from fluxc.recipes.generic import bf16
from fluxc.runtime.core.families import ENCODER_KINDS

# Left in bf16: what is small and runs once per step (embedders, the time embedding), the final norm and
# projection (their error lands on the prediction unaveraged), and every family's text encoders and the VAE.
QUANT_EXCLUDE = ("head:*", "tail:*", *(f"{kind}:*" for kind in ENCODER_KINDS), "vae:*", "vae_encoder:*")
# Weight-only: every block's AdaLN modulation GEMM. hoist_schedule runs them once per generation, so their
# time hardly counts, but their weights do: 3.2 B parameters, 6.4 GB in bf16 (FLUX.1-dev). Stored in e4m3
# they halve, and their activations (the time embedding) stay bf16.
QUANT_WEIGHT_ONLY = ("*:norm1.linear.*", "*:norm1_context.linear.*", "*:norm.linear.*")
# the *_epilogues recipes' (passes/fuse_fp8_epilogues.py); "joined": a single block's output projection as one GEMM,
# 0.347 ms against the two chained kernels' 0.374 on an H100 (results/2026-12-07-h100-fp8-gemm-joined-b199e1e.json)
EPILOGUES = ("gate_residual", "joined", "plain")


def sm90_fp8():
    """bf16 activations, FP8 e4m3 GEMMs for every block linear (per-channel weight, per-token activation
    scales, torch._scaled_mm rowwise); the build check holds each segment to the FP8 SQNR floor. Context-parallel
    builds send q, k, v to the other ranks in e4m3."""
    return dataclasses.replace(bf16(), name="sm90_fp8", precision=Precision.FP8, quant_exclude=QUANT_EXCLUDE,
                               quant_weight_only=QUANT_WEIGHT_ONLY, ulysses_e4m3=True,
                               check_rtol=10 ** (-FP8_SEGMENT_SQNR_DB / 20))


def sm90_fp8_attn():
    """sm90_fp8 with attention in FP8 too: e4m3 q and k (static scales bounded by the RMSNorm weights), v
    (a per-tensor scale at run time) and output, through cuDNN's FP8 SDPA; held to a lower segment floor."""
    return dataclasses.replace(sm90_fp8(), name="sm90_fp8_attn", fp8_attention=True,
                               check_rtol=10 ** (-FP8_ATTENTION_SEGMENT_SQNR_DB / 20))


def sm90_fp8_epilogues():
    """sm90_fp8 with its FP8 GEMMs on fluxc's Triton kernel (runtime/ops/fp8_gemm.py): the output projections add
    their gated residual in the GEMM's store, and the other GEMMs ("plain") run there too, where it beat cuBLAS on
    an H100 (benchmarks/results/2026-12-06-h100-fp8-gemm-dca7e98.json; fewer than 1024 rows stay on cuBLAS). Not
    the GELU: its fused up-projection gains 0.02 ms, but the down-projection reading its 1x128-block scales loses
    0.08 to per-token ones; fp8_epilogues=("gate_residual", "gelu") builds it. Same floor as sm90_fp8."""
    return dataclasses.replace(sm90_fp8(), name="sm90_fp8_epilogues", fp8_epilogues=EPILOGUES)


def sm90_fp8_attn_epilogues():
    """sm90_fp8_attn (attention in FP8 through cuDNN) with sm90_fp8_epilogues' GEMMs; sm90_fp8_attn's floor."""
    return dataclasses.replace(sm90_fp8_attn(), name="sm90_fp8_attn_epilogues", fp8_epilogues=EPILOGUES)
