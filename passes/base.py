"""What every pass takes and returns, and the small graph-editing helpers the passes share."""

import dataclasses
import re

import torch
from torch.fx.node import map_arg

from fluxc.ir import WeightSource, weight_placeholders
from fluxc.recipes import Recipe

aten = torch.ops.aten
VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
# The traced attention kernels (CPU, flash, memory-efficient, cuDNN): q, k, v are their first three arguments.
ATTENTION = (aten._scaled_dot_product_flash_attention_for_cpu.default, aten._scaled_dot_product_flash_attention.default,
             aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_cudnn_attention.default)


@dataclasses.dataclass(frozen=True)
class PassContext:
    recipe: Recipe
    target: str  # "cpu" | "sm_90" | ...
    segment_kind: str  # "head" | "double" | "single" | "tail"
    schedule_inputs: tuple[str, ...] = ()  # activation inputs known for every step before the loop (hoist_schedule)
    calibrated: bool = False  # the build calibrated static FP8 activation scales (quantize_fp8, --calibrate)
    world_size: int = 1  # ranks the segment's tokens are split over (shard_attention, --world-size)


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A candidate a pass looked at and left alone: `fluxc build --explain` shows the deepest one."""

    node: str
    reason: str
    depth: int = 0  # how many of the pass's checks the candidate passed first


@dataclasses.dataclass
class PassResult:
    graph: torch.fx.GraphModule
    counts: dict[str, int]  # rewrite counts by rule; pinned by tests/test_passes.py on `tiny`
    rejected: list[Rejection] = dataclasses.field(default_factory=list)
    # graphs the pass split off the segment, by role: "schedule" (hoist_schedule.Hoisted: the per-generation part),
    # "probe" (insert_cache_points.Probe: the TeaCache probe); the build makes each its own segment
    side: dict[str, object] = dataclasses.field(default_factory=dict)
    report: dict | None = None  # what the manifest records of this pass beyond counts (quantized layers)


class NoMatch(Exception):
    """Raised by a pattern check; the pass turns it into a Rejection."""

    def __init__(self, node: torch.fx.Node, reason: str, depth: int = 0):
        super().__init__(reason)
        self.rejection = Rejection(node.name if isinstance(node, torch.fx.Node) else str(node), reason, depth)


def is_aten(node, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def expect(node, *targets, depth: int = 0, what: str = "") -> torch.fx.Node:
    """`node` if it calls one of `targets`, else NoMatch naming what was found instead."""
    if not is_aten(node, *targets):
        is_call = isinstance(node, torch.fx.Node) and node.op == "call_function"
        found = node.target if is_call else getattr(node, "op", node)
        names = " or ".join(str(t).removeprefix("aten.").removesuffix(".default") for t in targets)
        raise NoMatch(node, f"{what or 'expected'} {names}, found {found}", depth)
    return node


def strip_casts(node):
    """Follow dtype-only `_to_copy` nodes back to their source (bf16 traces wrap math in fp32 casts).
    Patterns matched through casts may round differently; every fusion states a tolerance, not exactness."""
    while is_pure_cast(node):
        node = node.args[0]
    return node


def is_pure_cast(node) -> bool:
    """A `_to_copy` that changes at most the dtype (same device, strided layout)."""
    return (is_aten(node, aten._to_copy.default) and set(node.kwargs) <= {"dtype", "layout", "device"}
            and node.kwargs.get("layout", torch.strided) == torch.strided
            and node.meta["val"].device == node.args[0].meta["val"].device)


def replace_with(node: torch.fx.Node, replacement: torch.fx.Node) -> None:
    node.replace_all_uses_with(replacement)
    node.graph.erase_node(node)


def call(graph: torch.fx.Graph, target, *args, **kwargs) -> torch.fx.Node:
    """Insert target(*args, **kwargs) at the graph's insertion point, with meta["val"] from fake tensors."""
    node = graph.call_function(target, args, kwargs)
    vals = map_arg((args, kwargs), lambda n: n.meta["val"])
    fake_mode = torch._guards.detect_fake_mode(vals)
    with fake_mode:
        node.meta["val"] = target(*vals[0], **vals[1])
    return node


def copy_backward_slice(gm: torch.fx.GraphModule, roots) -> tuple[torch.fx.Graph, dict, list[torch.fx.Node]]:
    """A new graph holding copies of `roots` and every node they depend on, in gm's order, its placeholders
    first (weights before activations, as segments order them). Returns it, the map from gm's nodes to the
    copies, and gm's placeholders it copied."""
    needed: set[torch.fx.Node] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    ordered = [n for n in gm.graph.nodes if n in needed]
    placeholders = sorted((n for n in ordered if n.op == "placeholder"), key=lambda n: "weight" not in n.meta)
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in placeholders + [n for n in ordered if n.op != "placeholder"]:
        env[node] = graph.node_copy(node, env.__getitem__)
    return graph, env, placeholders


def add_weight(gm: torch.fx.GraphModule, source: WeightSource, like: torch.Tensor) -> torch.fx.Node:
    """A new weight placeholder (after the existing weights) holding `source`, with `like`'s fake value."""
    weights = weight_placeholders(gm)
    anchor = weights[-1] if weights else None
    with gm.graph.inserting_after(anchor) if anchor else gm.graph.inserting_before(next(iter(gm.graph.nodes))):
        node = gm.graph.placeholder(re.sub(r"\W+", "_", source.name).strip("_"))
    node.meta["weight"], node.meta["val"] = source, like
    return node


def drop_unused_weights(gm: torch.fx.GraphModule) -> None:
    """Weights a rewrite replaced leave the engine with it (activation inputs always stay)."""
    for node in weight_placeholders(gm):
        if not node.users:
            gm.graph.erase_node(node)


def rewrite_all(candidates, check_and_rewrite) -> tuple[int, list[Rejection]]:
    """Apply check_and_rewrite to each candidate; count successes and collect the NoMatch rejections."""
    done, rejected = 0, []
    for c in candidates:
        try:
            check_and_rewrite(c)
            done += 1
        except NoMatch as e:
            rejected.append(e.rejection)
    return done, rejected
