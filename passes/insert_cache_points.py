"""Insert the cache points step-skipping policies need: the cut after the first double block, and its probe.

FLUX's block stack is the cache unit (DESIGN.md, "Cache points"): the runtime runs the first double block
(FBCache) or only its modulated input (TeaCache), decides on the GPU whether the rest of the stack may be
skipped, and if so adds the cached residual of the rest instead. The cut needs no graph change: it is the
segment boundary between the first double block and the second. This pass checks the double block has the
residual stream the policies assume (an input and an output both named `hidden_states`) and splits off
the probe graph TeaCache reads: the image stream's AdaLN-modulated input, in the activation dtype.

Pattern (a double block after fuse_adaln and hoist_schedule):
    %hidden_states: [B, S, C] = input;  %sched_addmm: [B, 12C] = input
    %slice = aten.slice(%sched_addmm, 1, 0, 6C);  %split = aten.split(%slice, C, 1) ...
    %adaln = fluxc.adaln(%hidden_states, %getitem_1, %getitem, eps)           (or fluxc.adaln_fp8)
Split off (the block graph itself is unchanged):
    probe graph:  (%hidden_states, %sched_addmm) -> fluxc.adaln(%hidden_states, scale, shift, eps)
                  output "cache_modulated" [B, S, C]
The probe reads the same schedule values as the block (the runtime feeds it the first double layer's),
and re-states an fp8 block's adaln_fp8 as the bf16 adaln: TeaCache compares values, not e4m3 codes.
FBCache's probe, the first block's residual (its output minus its input hidden_states), is one
subtraction the runtime does on the tensors it already holds.
Pre:  fuse_adaln ran (else no probe: the rejection says so, and only FBCache is available).
Post: counts["probes"] == 1 for a double block; the segment graph is unchanged.
Numerics: exact (the probe is the block's own modulation op on the block's own inputs).
"""

import dataclasses

import torch

from fluxc.passes.base import PassContext, PassResult, Rejection, call, copy_backward_slice, is_aten
from fluxc.runtime.core.cache_config import PROBE_OUTPUT

RESIDUAL = "hidden_states"  # the image stream: the name a double block's residual input and output share


@dataclasses.dataclass
class Probe:
    """The graph split off: the first double block's inputs -> its modulated image input."""

    graph: torch.fx.GraphModule
    inputs: list[str]  # its activation inputs, named as the block's


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.segment_kind != "double":
        return PassResult(gm, {"probes": 0}, [Rejection("graph", "cache points go after the first double block")])
    residual = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == RESIDUAL), None)
    if residual is None or RESIDUAL not in gm.graph.output_node().meta["names"]:
        return PassResult(gm, {"probes": 0}, [Rejection("graph", f"no residual stream: no input and output '{RESIDUAL}'")])
    adaln = (torch.ops.fluxc.adaln.default, torch.ops.fluxc.adaln_fp8.default)
    modulation = next((u for u in residual.users if is_aten(u, *adaln)), None)
    if modulation is None:
        return PassResult(gm, {"probes": 0}, [Rejection(
            residual.name, "no fluxc.adaln reads the image stream (fuse_adaln off?): no TeaCache probe", depth=1)])
    return PassResult(gm, {"probes": 1}, side={"probe": _split_off(gm, modulation)})


def _split_off(gm: torch.fx.GraphModule, modulation: torch.fx.Node) -> Probe:
    """A new graph computing the bf16 adaln of `modulation`'s inputs."""
    graph, env, placeholders = copy_backward_slice(gm, modulation.all_input_nodes)
    x, scale, shift, eps = modulation.args
    probe = call(graph, torch.ops.fluxc.adaln.default, env[x], env[scale], env[shift], eps)
    out = graph.output([probe])
    out.meta["names"] = [PROBE_OUTPUT]
    return Probe(torch.fx.GraphModule(torch.nn.Module(), graph), [n.name for n in placeholders if "weight" not in n.meta])
