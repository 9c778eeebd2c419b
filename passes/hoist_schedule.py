"""Hoist what depends only on the step schedule out of the denoising loop.

A segment's schedule inputs (PassContext.schedule_inputs: the head's timestep, guidance and pooled text
embedding; the blocks' and the tail's `temb`) are known for every step before the loop starts. Every node
that depends on them and on no other activation — the time/guidance/text embedding, and each block's
AdaLN modulation GEMV over silu(temb) — is split off into a second graph, run once per generation over
all steps' rows at once (the runtime's schedule precompute); the loop graph takes its results as inputs.

Pattern (a double block after fuse_qkv):
    %temb: [B, C] = input
    %silu = aten.silu(%temb);  %addmm = aten.addmm(%mod_bias, %silu, aten.t(%mod_weight))    [B, 12C]
    %split = aten.split(%addmm, C, 1) ...   (the loop's uses: views of %addmm)
Rewrite:
    loop graph:      %sched_addmm: [B, 12C] = input;  %split = aten.split(%sched_addmm, C, 1) ...
    hoisted graph:   (%mod_weight, %mod_bias, %temb) -> %addmm          returned as PassResult.side["schedule"]
Why: each modulation GEMV reads its whole weight for one row per step (the 57 blocks' weights are 6.5 GB
at FLUX.1-dev's size: ~2.1 ms per step on the H200, where a 3072 -> 36864 GEMV took 72 us for 1 row
and 73 us for 32). Over 28 steps' rows at once they read it once per generation.
The split stops before views, pointwise ops and casts (free in the loop graph, where Inductor fuses them
into their users), so the hoisted graph returns whole GEMM outputs, plus any value the segment returned
(the head's temb), which then leaves the loop graph's outputs.
Pre:  the output node's meta["names"] names the outputs.  Post: counts["values"] loop inputs made;
the schedule inputs and the weights only the hoisted graph reads leave the loop graph.
Numerics: exact on the same rows. The runtime runs the hoisted graph over steps x batch rows, which is
sound only if every output row depends on its input row alone (true for GEMMs, pointwise ops, and
concatenation along features); the build checks the composed graphs with distinct rows.
"""

import dataclasses
import operator

import torch

from fluxc.ir import weight_placeholders
from fluxc.passes.base import (VIEWS, PassContext, PassResult, Rejection, aten, copy_backward_slice, is_aten,
                               is_pure_cast)

# Ops that only reinterpret their input: left in the loop graph when they are at the hoisted region's edge.
VIEW_LIKE = VIEWS + (aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.slice.Tensor,
                     aten.split.Tensor, aten.split_with_sizes.default, aten.permute.default, aten.expand.default)


@dataclasses.dataclass
class Hoisted:
    """The graph split off: schedule inputs (and weights) -> the loop graph's new inputs."""

    graph: torch.fx.GraphModule
    inputs: list[str]  # its activation inputs: schedule input names
    values: list[str]  # its outputs, by the names the loop graph's new inputs have


def _cheap(node: torch.fx.Node) -> bool:
    """Views, pointwise ops and casts: free to recompute per step (Inductor fuses them into their users)."""
    return (is_aten(node, *VIEW_LIKE) or node.target is operator.getitem or is_pure_cast(node)
            or (isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags))


def _hoistable(gm: torch.fx.GraphModule, schedule: set[str], returned: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """Compute nodes that read a schedule input and no other activation, less the cheap ones at the edge
    that are not returned: the region ends at GEMM outputs (and at returned values)."""
    deps: dict[torch.fx.Node, frozenset] = {}
    weights = set(weight_placeholders(gm))
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            deps[node] = frozenset() if node in weights else frozenset([node.name])
        elif node.op == "call_function":
            deps[node] = frozenset().union(*(deps[a] for a in node.all_input_nodes))
    region = {n for n, d in deps.items() if n.op == "call_function" and d and d <= schedule}
    for node in reversed(list(gm.graph.nodes)):
        if node in region and node not in returned and _cheap(node) and not any(u in region for u in node.users):
            region.discard(node)
    for node in list(region):  # a tuple-valued node (split) used outside: its getitems are the values
        if not isinstance(node.meta["val"], torch.Tensor):
            region.update(node.users)
    return region


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    output = gm.graph.output_node()
    names = list(output.meta["names"])
    region = _hoistable(gm, set(ctx.schedule_inputs), set(output.args[0]))
    frontier = [n for n in gm.graph.nodes if n in region and any(u not in region for u in n.users)]
    if not frontier:
        why = "no schedule inputs" if not ctx.schedule_inputs else f"no node reads only {list(ctx.schedule_inputs)}"
        return PassResult(gm, {"values": 0}, [Rejection("graph", why)])
    returned = {v: names[i] for i, v in enumerate(output.args[0]) if v in region}
    values = [returned.get(n, f"sched_{n.name}") for n in frontier]
    hoisted = _split_off(gm, frontier, values)

    last_input = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    for node, name in zip(reversed(frontier), reversed(values)):
        with gm.graph.inserting_after(last_input):
            ph = gm.graph.placeholder(name)
        ph.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(ph)
    # a hoisted value the segment returned is no longer the loop's business
    keep = [i for i, v in enumerate(output.args[0]) if not (v.op == "placeholder" and v.name in values)]
    output.args = ([output.args[0][i] for i in keep],)
    output.meta["names"] = [names[i] for i in keep]
    gm.graph.eliminate_dead_code()
    for node in [n for n in gm.graph.nodes if n.op == "placeholder" and not n.users]:
        gm.graph.erase_node(node)  # the schedule inputs, the weights only the hoisted graph reads
    gm.recompile()
    return PassResult(gm, {"values": len(frontier)}, side={"schedule": hoisted})


def _split_off(gm: torch.fx.GraphModule, frontier: list[torch.fx.Node], values: list[str]) -> Hoisted:
    """A new graph computing `frontier` from what it depends on."""
    graph, env, placeholders = copy_backward_slice(gm, frontier)
    out = graph.output([env[n] for n in frontier])
    out.meta["names"] = list(values)
    inputs = [n.name for n in placeholders if "weight" not in n.meta]
    return Hoisted(torch.fx.GraphModule(torch.nn.Module(), graph), inputs, list(values))
