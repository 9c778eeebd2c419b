"""Graph passes: one pass per file, each `run(graph, ctx) -> PassResult`; the order is in pipeline.py."""

from fluxc.passes.base import PassContext, PassResult

__all__ = ["PassContext", "PassResult"]
