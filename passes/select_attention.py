"""Lower attention to the fastest correct kernel for the target.

Pattern:  %sdpa = aten._scaled_dot_product_flash_attention(%q, %k, %v, 0.0, False, False, scale=s)
                  | aten._scaled_dot_product_efficient_attention(%q, %k, %v, None, False, 0.0, False, scale=s)
          %out  = getitem(%sdpa, 0)                  (the only output used: inference needs no logsumexp)
Rewrite (recipe.attention "auto" on sm_90 and later, or "cudnn"):
          %sdpa = aten._scaled_dot_product_cudnn_attention(%q, %k, %v, None, False, 0.0, False, False, scale=s)
          %out  = getitem(%sdpa, 0)
Why: on the H200 at FLUX shapes (B1 H24 S4608 D128, bf16) cuDNN's fused attention runs 598 TFLOP/s
against flash's 326 (benchmarks/README.md, measured 2026-11-22); attention is 14.9 of FLUX.1-dev's 74.4 TFLOP per step.
Pre:  q, k, v are [B, H, S, D] bf16/fp16 with D <= 128 (cuDNN's fast path), no dropout, not causal.
Post: counts["cudnn"] (cuDNN attention nodes after the pass) == n_double + n_single segments' attention
calls on sm_90+; counts["to_cudnn"] says how many this pass rewrote (0 where torch's own dispatch already
chose cuDNN while tracing, as torch 2.11 does on the H200). On the CPU target nothing matches (the CPU
trace holds `_scaled_dot_product_flash_attention_for_cpu`).
Numerics: both kernels compute exact softmax attention with fp32 accumulation; they differ in
summation order only (bf16 rounding noise). Held by the recipe's segment check (bf16: 2e-2 relative
to diffusers eager) at build time and by tests/test_gpu.py.
"""

import operator

import torch

from fluxc.passes.base import PassContext, PassResult, call, replace_with
from fluxc.runtime.core import targets

aten = torch.ops.aten
FLASH = aten._scaled_dot_product_flash_attention.default
EFFICIENT = aten._scaled_dot_product_efficient_attention.default
CUDNN = aten._scaled_dot_product_cudnn_attention.default
# where dropout_p and is_causal sit in each kernel's positional arguments (after q, k, v)
_DROPOUT_CAUSAL = {FLASH: (3, 4), EFFICIENT: (5, 6)}


def wanted_kernel(recipe, target: str) -> str:
    """The kernel the recipe asks for on this target: "cudnn" or "traced" (keep what tracing chose)."""
    if recipe.attention != "auto":
        return recipe.attention
    return "cudnn" if targets.has(target, "cudnn_attention") else "traced"


def describe(recipe, target: str) -> str:
    return "cuDNN attention" if wanted_kernel(recipe, target) == "cudnn" else "keeps the traced attention kernel"


def check(node: torch.fx.Node) -> str | None:
    """None if `node` can become cuDNN attention, else why not."""
    if node.op != "call_function" or node.target not in _DROPOUT_CAUSAL:
        return "not flash or efficient attention"
    if node.target == EFFICIENT and node.args[3] is not None:
        return "has an attention bias"
    q = node.args[0].meta["val"]
    dropout, causal = (node.args[i] if len(node.args) > i else d for i, d in zip(_DROPOUT_CAUSAL[node.target], (0.0, False)))
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} (cuDNN attention is bf16/fp16 only)"
    if q.shape[-1] > 128:
        return f"head dim {q.shape[-1]} > 128"
    if dropout or causal:
        return "dropout or causal mask"
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
        return "uses an output other than the attention result"
    return None


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    counts = {"to_cudnn": 0, "cudnn": 0}
    if wanted_kernel(ctx.recipe, ctx.target) != "cudnn":
        return PassResult(gm, counts)
    for node in list(gm.graph.nodes):
        if check(node) is not None:
            continue
        q, k, v = node.args[:3]
        with gm.graph.inserting_before(node):
            new = call(gm.graph, CUDNN, q, k, v, None, False, 0.0, False, False, scale=node.kwargs.get("scale"))
        replace_with(node, new)
        counts["to_cudnn"] += 1
    counts["cudnn"] = sum(n.target == CUDNN for n in gm.graph.nodes)
    gm.recompile()
    return PassResult(gm, counts)

