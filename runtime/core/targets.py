"""Targets: `cpu`, or `sm_XY` (optionally `sm_XYa`) for the CUDA compute capability X.Y an engine is compiled for,
and one table of what each capability can do. Every caller (build validation, the passes' lowering, doctor)
asks here; nothing else parses a target name.
"""

import re

import torch

from fluxc.runtime.core.errors import FluxcError

# The lowest SM with each feature. The CPU target has none natively and emulates what the recipes allow.
FIRST_SM = {
    "fp8": 89,  # e4m3 tensor cores (torch._scaled_mm): Ada, Hopper, Blackwell
    "cudnn_attention": 90,  # cuDNN's SDPA as the fastest attention kernel, and its FP8 variant
    "nvfp4": 100,  # block-scaled FP4 tensor cores (Blackwell); below it NVFP4 is an exact emulation
}


def sm(target: str) -> int | None:
    """The SM number of a target name (90 for sm_90 and sm_90a), None for the CPU; FluxcError for anything else."""
    if target == "cpu":
        return None
    m = re.fullmatch(r"sm_(\d{2,3})a?", target)
    if not m:
        raise FluxcError(f"Unknown target '{target}'.", "Use cpu, auto, or a GPU architecture such as sm_90 or sm_100.")
    return int(m.group(1))


def has(target: str, feature: str) -> bool:
    """Whether the target runs `feature` (a FIRST_SM key) natively."""
    number = sm(target)
    return number is not None and number >= FIRST_SM[feature]


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
