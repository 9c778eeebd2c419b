"""The pass pipeline: an ordered list in named phases. `fluxc passes` prints it.

Precision- and target-dependent passes are inline conditionals here, nowhere else.
"""

import dataclasses
import os
from typing import Callable

import torch

from fluxc import ir
from fluxc.passes import (dedupe_nodes, eliminate_dead_code, functionalize_inplace, fuse_adaln, fuse_epilogues,
                          fuse_fp8_epilogues, fuse_qk_norm_rope, fuse_qkv, hoist_schedule, insert_cache_points,
                          lower_nvfp4, quantize_fp8, quantize_fp8_attention, quantize_nvfp4, remove_noop_ops,
                          select_attention, shard_attention)
from fluxc.passes.base import PassContext
from fluxc.recipes import Precision


@dataclasses.dataclass(frozen=True)
class Pass:
    name: str
    phase: str
    run: Callable
    detail: str = ""  # what the pass does on this target, where that depends on it (`fluxc passes` prints it)


LOWER = "lower"  # the target-specific phase: a plan (--stage plan) stops before it, --from PLAN runs it


def resolve(recipe, target: str) -> list[Pass]:
    """The passes a build with this recipe and target runs, in order."""
    return [
        # canonicalize: make the traced graph small and pure before any pattern matching
        Pass("functionalize_inplace", "canonicalize", functionalize_inplace.run),  # first: others assume purity
        Pass("remove_noop_ops", "canonicalize", remove_noop_ops.run),
        Pass("dedupe_nodes", "canonicalize", dedupe_nodes.run),  # after noop removal exposes equal nodes
        Pass("eliminate_dead_code", "canonicalize", eliminate_dead_code.run),
        # fuse: one kernel where the trace has several (recipe.fusion off keeps the traced graph for comparison)
        *([
            Pass("fuse_qkv", "fuse", fuse_qkv.run),  # first: leaves GELU-feeding linears to fuse_epilogues
            Pass("fuse_epilogues", "fuse", fuse_epilogues.run),
            Pass("fuse_qk_norm_rope", "fuse", fuse_qk_norm_rope.run),  # q/k may be fuse_qkv's column slices
            Pass("fuse_adaln", "fuse", fuse_adaln.run),  # scale/shift may be fuse_qkv's slices of the fused GEMV
        ] if recipe.fusion else []),
        # quantize: after fusion, so a fused QKV weight quantizes as one tensor
        # FP8 attention first: quantize_fp8 then feeds the output projections its e4m3 output
        *([Pass("quantize_fp8_attention", "quantize", quantize_fp8_attention.run)] if recipe.fp8_attention else []),
        *([Pass("quantize_fp8", "quantize", quantize_fp8.run)] if recipe.precision is Precision.FP8 else []),
        *([Pass("fuse_fp8_epilogues", "quantize", fuse_fp8_epilogues.run)] if recipe.fp8_epilogues else []),
        *([Pass("quantize_nvfp4", "quantize", quantize_nvfp4.run)] if recipe.precision is Precision.NVFP4 else []),
        # hoist: after quantize, so the hoisted graph holds rewritten ops (the fused modulation GEMM)
        *([Pass("hoist_schedule", "hoist", hoist_schedule.run)] if recipe.hoist_schedule else []),
        # cache points: after hoist, so the TeaCache probe reads the block's schedule values, not its GEMV
        Pass("insert_cache_points", "cache", insert_cache_points.run),
        # parallel: traced for one rank's tokens, attention over all ranks' (a no-op at world size 1)
        Pass("shard_attention", "parallel", shard_attention.run),
        # lower: kernel choices for the target (last: everything before it is portable across targets)
        Pass("select_attention", LOWER, select_attention.run, select_attention.describe(recipe, target)),
        *([Pass("lower_nvfp4", LOWER, lower_nvfp4.run, lower_nvfp4.describe(target))]
          if recipe.precision is Precision.NVFP4 else []),
    ]


@dataclasses.dataclass
class PipelineResult:
    graph: torch.fx.GraphModule
    counts: dict[str, dict[str, int]]  # {pass: its rewrite counts}
    explain: dict[str, str]  # {pass that rewrote nothing: the check that rejected its nearest candidate}
    side: dict[str, object] = dataclasses.field(default_factory=dict)  # graphs passes split off, by role (PassResult)
    reports: dict[str, dict] = dataclasses.field(default_factory=dict)  # {pass: its report}, for the manifest


def run_pipeline(gm: torch.fx.GraphModule, ctx: PassContext, dump_dir: str | None = None, segment_name: str = "",
                 passes: list[Pass] | None = None) -> PipelineResult:
    """Verify, run every pass (default: the resolved pipeline), verifying after each."""
    passes = resolve(ctx.recipe, ctx.target) if passes is None else passes
    ir.verify(gm, f"{segment_name} at pipeline entry")
    _dump(dump_dir, 0, "trace", segment_name, gm)
    counts, explain, side, reports = {}, {}, {}, {}
    for i, p in enumerate(passes, start=1):
        result = p.run(gm, ctx)
        gm, counts[p.name] = result.graph, result.counts
        side |= result.side
        if result.report is not None:
            reports[p.name] = result.report
        if result.rejected and not any(result.counts.values()):
            nearest = max(result.rejected, key=lambda r: r.depth)
            explain[p.name] = f"%{nearest.node}: {nearest.reason}"
        ir.verify(gm, f"{segment_name} after {p.name}")
        _dump(dump_dir, i, p.name, segment_name, gm)
        for role, split in result.side.items():
            ir.verify(split.graph, f"{segment_name}, the {role} graph {p.name} split off")
            _dump(dump_dir, i, p.name, f"{segment_name}-{role}", split.graph)
    return PipelineResult(gm, counts, explain, side, reports)


def _dump(dump_dir, index, pass_name, segment_name, gm) -> None:
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        path = os.path.join(dump_dir, f"{index:02d}-{pass_name}-{segment_name}.txt")
        with open(path, "w") as f:
            f.write(ir.dump(gm, f"{segment_name} after {pass_name}"))
