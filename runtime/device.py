"""Targets: `cpu` or `sm_XY` for the CUDA compute capability X.Y an engine is compiled for."""

import torch

from fluxc.runtime.errors import FluxcError


def local_target() -> str:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"sm_{major}{minor}"
    return "cpu"


def target_device(target: str) -> torch.device:
    return torch.device("cpu") if target == "cpu" else torch.device("cuda")


def check_runs_here(manifest: dict) -> torch.device:
    """The device to run an engine on, or a FluxcError if this machine cannot run it."""
    built_for, gpu = manifest["target"]["sm"], manifest["target"]["device"]
    here = local_target()
    if built_for != here:
        where = "this machine has no CUDA GPU" if here == "cpu" else f"this GPU is {here} ({torch.cuda.get_device_name()})"
        raise FluxcError(
            f"The engine was built for {built_for} ({gpu}); {where}.",
            f"Rebuild it here with `fluxc build --target {here}`: compiled kernels are specific to a GPU architecture.")
    built_torch = manifest["backend"]["torch"]
    if built_torch != torch.__version__:
        raise FluxcError(
            f"The engine's {manifest['backend']['name']} artifacts were built with torch {built_torch}; "
            f"this process has torch {torch.__version__}.",
            f"Rebuild the engine with torch {torch.__version__}, or run it with torch {built_torch}.")
    return target_device(built_for)
