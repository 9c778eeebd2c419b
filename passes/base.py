"""What every pass takes and returns."""

import dataclasses

import torch

from fluxc.recipes import Recipe


@dataclasses.dataclass(frozen=True)
class PassContext:
    recipe: Recipe
    target: str  # "cpu" | "sm_90" | ...
    segment_kind: str  # "head" | "double" | "single" | "tail"


@dataclasses.dataclass
class PassResult:
    graph: torch.fx.GraphModule
    counts: dict[str, int]  # rewrite counts by rule; pinned by tests/test_passes.py on `tiny`


def is_aten(node: torch.fx.Node, *targets) -> bool:
    return node.op == "call_function" and node.target in targets


def replace_with(node: torch.fx.Node, replacement: torch.fx.Node) -> None:
    node.replace_all_uses_with(replacement)
    node.graph.erase_node(node)
