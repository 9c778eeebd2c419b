"""Weight formats: how the build makes each weight a pass asks for by a WeightSource op (fluxc.ir), one table.

    fp8 / fp8_scale        sources[0] [N, K] in e4m3 with one scale per output channel, and those scales [N, 1] f32
                           (quantize_fp8: amax / 448 per row)
    rms_fp8_scale          a bound on |RMSNorm(x) * w| over the norm weights `sources` (sqrt(D) max |w|: a normed row
                           has norm sqrt(D)) / 448 as [1, 1, 1, 1] f32: the static e4m3 scale of normed q or k
                           (quantize_fp8_attention; rotary embedding keeps pair norms; 1% over for bf16 rounding)
    act_scale / act_global the calibrated input amax of the linears whose weights are `sources` (compiler/calibrate.py)
                           / 448 as [1, 1] f32 (FP8), / 2688 as [1] f32 (NVFP4's global scale)
    nvfp4 / nvfp4_scale / nvfp4_global
                           sources[0] [N, K] as NVFP4 e2m1 codes [N, K/2] u8, e4m3 block scales [N, K/16] and its global
                           scale [1] f32 (quantize_nvfp4; runtime/ops/nvfp4.py)
    nvfp4_swizzled         block scales sources[0] in cuBLASLt's swizzled layout (lower_nvfp4, native targets)
"""

import torch

from fluxc.ir import AMAX_SUFFIX, E4M3_MAX
from fluxc.runtime.ops import nvfp4
from fluxc.runtime.ops.kernels import quantize_rows

NVFP4_OPS = ("nvfp4", "nvfp4_scale", "nvfp4_global")  # codes, block scales, global: one quantize_weight each


def _fp8(source, parts, tensors, scale_only: bool) -> torch.Tensor:
    weight, scale = quantize_rows(parts[0].float())  # the runtime re-quantizes adapted weights with it too
    return scale if scale_only else weight


def _rms_fp8_scale(source, parts, tensors) -> torch.Tensor:
    bound = max(float(p.float().abs().max()) for p in parts) * parts[0].shape[-1] ** 0.5 * 1.01
    return torch.full((1, 1, 1, 1), bound / E4M3_MAX, device=parts[0].device)


def _calibrated_amax(source, tensors) -> torch.Tensor:
    amaxes = [tensors[n + AMAX_SUFFIX] for n in source.checkpoint_names()]
    return torch.stack(amaxes).amax().float().clamp_min(1e-12)


FORMATS = {
    "fp8": lambda source, parts, tensors: _fp8(source, parts, tensors, scale_only=False),
    "fp8_scale": lambda source, parts, tensors: _fp8(source, parts, tensors, scale_only=True),
    "rms_fp8_scale": _rms_fp8_scale,
    "act_scale": lambda source, parts, tensors: (_calibrated_amax(source, tensors) / E4M3_MAX).reshape(1, 1),
    "act_global": lambda source, parts, tensors: (_calibrated_amax(source, tensors) / nvfp4.GLOBAL_DIVISOR).reshape(1),
    **{op: (lambda source, parts, tensors, i=i: nvfp4.quantize_weight(parts[0])[i]) for i, op in enumerate(NVFP4_OPS)},
    "nvfp4_swizzled": lambda source, parts, tensors: nvfp4.swizzle_scales(parts[0]),
}
