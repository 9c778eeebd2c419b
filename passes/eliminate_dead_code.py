"""Remove nodes whose results nothing uses.

Pre/post: the graph's outputs are unchanged. Numerics: exact.
"""

import torch

from fluxc.passes.base import PassContext, PassResult


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(gm, {"removed": before - len(gm.graph.nodes)})
