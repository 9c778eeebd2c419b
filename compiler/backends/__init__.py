"""Backends turn one rewritten segment graph into a saved artifact.

The interface is deliberately small: `compile(gm, example_inputs, out_dir) -> callable` writes the
artifact under `out_dir` and returns something callable for the build-time numerics check. Loading is
the runtime's job (`fluxc.runtime.loaders`), keyed by the backend's `name`, so production never
imports the compiler.
"""

from typing import Callable, Protocol

import torch


class Backend(Protocol):
    name: str
    translates: frozenset[str]  # lowering passes the build skips for it: the backend translates their ops itself

    def compile(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor], out_dir: str,
                options: dict) -> Callable: ...

    def versions(self) -> dict[str, str]: ...


def get_backend(name: str) -> Backend:
    from fluxc.backends.inductor import InductorBackend
    from fluxc.backends.onnx import OnnxBackend
    from fluxc.backends.tensorrt import TensorRTBackend

    backends = {"inductor": InductorBackend, "onnx": OnnxBackend, "tensorrt": TensorRTBackend}  # validate._check_backend
    # checked the name and that this machine can run it
    return backends[name]()
