"""The one numerics module, used by the tests, the build-time check and the benchmarks.

The reference passed in must come from an independent path (diffusers eager, float64 math), never
from the code under test.
"""

import numpy as np
import torch

# Floors per precision against diffusers eager in that precision (DESIGN.md "Precisions").
RELATIVE_ERROR_FLOORS = {"fp32": 1e-4, "bf16": 2e-2}
# A fusion pass's contract: its segment output against the same segment unfused, per activation dtype.
# Fusions only regroup the same math (concatenated GEMMs, epilogues, a norm + rotation in one kernel),
# so they may move roundings, never add error beyond a few ulps of the activation dtype.
REWRITE_TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2}
# FP8 (quantize_fp8): each quantized linear against float64 math (e4m3 keeps 3 mantissa bits: ~29 dB per
# operand), and a segment's output against the same segment in bf16 / diffusers eager at build time. On the
# tiny model's random weights a double block's errors compound through attention to ~23 dB, hence the lower
# segment floor (20 dB = 10% relative error).
FP8_LINEAR_SQNR_DB = 25.0
FP8_SEGMENT_SQNR_DB = 20.0
# FP8 attention (recipe sm90_fp8_attn): q.k in e4m3 errs by ~2^-4 of each score, and the softmax turns a
# score's absolute error into a relative error of its weight; on diffuse random-weight attention cuDNN's
# FP8 SDPA measured ~21 dB against float64 on its own (a probe recorded in benchmarks/README.md).
FP8_ATTENTION_SQNR_DB = 18.0
FP8_ATTENTION_SEGMENT_SQNR_DB = 15.0
# e4m3 transfers of context parallelism (Recipe.ulysses_e4m3): q, k and v rounded to e4m3 per (token, head) row
# (~26 dB each on Gaussian rows); attention's output against attention over the bf16 rows (27.4 dB on tiny rows).
FP8_WIRE_SQNR_DB = 25.0

# NVFP4 (quantize_nvfp4): e2m1 keeps 1 mantissa bit; 16-element blocks with e4m3 scales give ~20 dB per
# operand on Gaussian data, so a linear with both operands quantized lands near 17 dB against float64; a
# segment compounds several (and attention) against its bf16 graph.
NVFP4_LINEAR_SQNR_DB = 15.0
NVFP4_SEGMENT_SQNR_DB = 10.0

# LoRA adapters on quantized engines merge then re-quantize (runtime/adapters.py): each adapted weight is rounded
# a second time, from its dequantized base. The contract: the adapted engine's latents against diffusers bf16 with
# the adapter lose at most this much SQNR against the same engine's without an adapter against diffusers bf16
# without one (tiny model, measured: fp8 3.6 dB, nvfp4 2.8 dB; bf16 4.7 dB, where the merge rounds W + dW to bf16
# once and PEFT rounds its branch instead), and stay above the precision's segment floor.
ADAPTER_SQNR_LOSS_DB = 5.0


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (Frobenius norms)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def sqnr_db(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20 log10(||expected|| / ||actual - expected||)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float(20 * torch.log10(e.norm() / (a - e).norm().clamp_min(1e-30)))


def assert_close_report(actual: torch.Tensor, expected: torch.Tensor, *, name: str, rtol: float) -> None:
    """Assert relative error <= rtol; on failure name the output and summarise the mismatch."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    err = relative_error(actual, expected)
    if not err <= rtol:  # also fails on NaN
        diff = (actual.double() - expected.double()).abs()
        worst = int(diff.flatten().argmax())
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {rtol:.1e}; max |diff| {diff.max():.3e} at flat index {worst} "
            f"(got {actual.flatten()[worst]:.6g}, expected {expected.flatten()[worst]:.6g}); "
            f"{int((diff > rtol * expected.abs().double().max()).sum())} of {diff.numel()} elements off")


def psnr_db(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio of float images in [0, 1]: 10 log10(1 / mean squared error)."""
    mse = float(np.mean((np.asarray(image, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def ssim(image: np.ndarray, reference: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004) of float images [H, W, C] in [0, 1]: Gaussian window 11,
    sigma 1.5, K1 0.01, K2 0.03, population statistics, averaged over the valid region and the channels."""
    x, y = (torch.as_tensor(np.asarray(a, np.float64)).permute(2, 0, 1)[:, None] for a in (image, reference))
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - window // 2) ** 2) / (2 * sigma**2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]  # [1, 1, k, k], sums to 1
    mean = lambda t: torch.nn.functional.conv2d(t, w)
    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx**2, mean(y * y) - my**2, mean(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())
