"""Graph passes: one pass per file, each `run(graph, ctx) -> PassResult`; the order is in pipeline.py.

Passes rewrite graphs to fluxc's ops (`torch.ops.fluxc.*`); importing fluxc.runtime.ops here registers them all
once for every pass. Shared helpers live in base.py (graph editing) and linear.py (linears and quantization);
no pass imports another pass.
"""

import fluxc.runtime.ops  # noqa: F401  (registers torch.ops.fluxc.*)
from fluxc.passes.base import PassContext, PassResult

__all__ = ["PassContext", "PassResult"]
