"""The recipe dataclass and the precision enum."""

import dataclasses
import enum

from fluxc.runtime.core.cache_config import CacheConfig, cache_config_from_dict


class Precision(str, enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP8 = "fp8"
    NVFP4 = "nvfp4"

    @property
    def activation_dtype(self) -> str:
        """The dtype activations and unquantized weights are kept in."""
        return "float32" if self is Precision.FP32 else "bfloat16"


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    precision: Precision
    # Per-segment numerics check at build time: max relative error of the compiled segment against
    # the eager diffusers module it was traced from (DESIGN.md, "Precisions").
    check_rtol: float
    # The same check for the text encoders and the VAE: whole multi-layer networks (T5-XXL has 24 layers),
    # where the compiled and eager paths round differently at every layer. None: check_rtol.
    component_check_rtol: float | None = None
    # Inductor config patches applied to every segment compile.
    inductor_options: tuple[tuple[str, object], ...] = ()
    # Attention kernel (passes/select_attention.py): "auto" = cuDNN on sm_90+, else what tracing chose;
    # "cudnn" forces it; "traced" keeps the traced kernel.
    attention: str = "auto"
    # Fusion passes (passes/fuse_*.py); off builds the traced graph as is, to measure what fusion buys.
    fusion: bool = True
    # fuse_qkv: also fuse a single block's MLP input projection into its QKV GEMM (then its GELU runs as a
    # separate kernel instead of in the GEMM's epilogue; measured slower on the H200, see fuse_qkv.py).
    qkv_with_mlp: bool = False
    # Hoist what depends only on the step schedule (time embedding, AdaLN modulation GEMVs) out of the
    # denoising loop: computed once per generation for every step (passes/hoist_schedule.py).
    hoist_schedule: bool = True
    # fp8 / nvfp4: linears left in bf16, as fnmatch patterns over "segment kind:weight name"
    # (passes/quantize_fp8.py, passes/quantize_nvfp4.py).
    quant_exclude: tuple[str, ...] = ()
    # fp8 / nvfp4: linears whose weights are stored quantized but multiply in bf16 (dequantized in the graph).
    quant_weight_only: tuple[str, ...] = ()
    # fp8: attention on e4m3 q, k, v through cuDNN's FP8 SDPA (sm_90+; passes/quantize_fp8_attention.py).
    fp8_attention: bool = False
    # Its kernel (runtime/ops/kernels.py, attention_fp8): "cudnn" (cuDNN's FP8 SDPA), "flash3" (FlashAttention-3's
    # FP8 forward, sm_90 only, the flash_attn_3 package; its bf16 output is cast to e4m3 in one more pass) or "auto"
    # (the faster of the two on the GPU building the engine, fluxc.tactics; cuDNN's where FA3 cannot run).
    fp8_attention_kernel: str = "cudnn"
    # fp8: the epilogues FP8 GEMMs own (Triton; passes/fuse_fp8_epilogues.py): "gate_residual" (the output
    # projections' gated residual), "joined" (a single block's two output-projection halves in one K loop: one
    # kernel, not two), "gelu" (the MLP's GELU + quantization, in 1x128 blocks that the down-projection then
    # reads) and "plain" (the GEMMs left without one run on the Triton kernel too).
    fp8_epilogues: tuple[str, ...] = ()
    # Context parallelism (--world-size > 1): q, k and v cross to the other ranks as e4m3 rows with a scale each
    # (3/8 fewer bytes than bf16 q, k, v and output; passes/shard_attention.py). The FP8 recipes set it.
    ulysses_e4m3: bool = False
    # The step-skipping policy the engine runs by default (runtime/cache.py; `fluxc run --cache` overrides it).
    # Every fused engine carries the cache points both policies need (passes/insert_cache_points.py).
    cache: CacheConfig = CacheConfig()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["precision"] = self.precision.value
        d["inductor_options"] = [list(kv) for kv in self.inductor_options]
        d["quant_exclude"], d["quant_weight_only"] = list(self.quant_exclude), list(self.quant_weight_only)
        d["fp8_epilogues"] = list(self.fp8_epilogues)
        d["cache"] = self.cache.to_dict()
        return d


def recipe_from_dict(d: dict) -> Recipe:
    d = dict(d)
    d["precision"] = Precision(d["precision"])
    d["inductor_options"] = tuple(tuple(kv) for kv in d.get("inductor_options", ()))
    d["quant_exclude"], d["quant_weight_only"] = tuple(d.get("quant_exclude", ())), tuple(d.get("quant_weight_only", ()))
    epilogues = d.get("fp8_epilogues") or ()  # engines before 2026-12-06 stored a bool: True fused both
    d["fp8_epilogues"] = ("gate_residual", "gelu") if epilogues is True else tuple(epilogues)
    d["cache"] = cache_config_from_dict(d.get("cache"))
    return Recipe(**d)
