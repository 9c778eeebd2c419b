"""`fluxc doctor`: what this machine can build and run."""

import importlib
import importlib.util

import torch

from fluxc.records import machine_info, software_info
from fluxc.runtime.core import targets
from fluxc.runtime.ops.kernels import flash3_available


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _version(module: str) -> str:
    return getattr(importlib.import_module(module), "__version__", "version unknown")


def precisions(target: str) -> dict[str, str]:
    """precision -> how an engine for `target` runs it ("native", "emulated", or why not)."""
    if target == "cpu":  # the CPU target emulates FP8 GEMMs and NVFP4 in plain torch
        return {"fp32": "native", "bf16": "native", "fp8": "emulated (CPU _scaled_mm)", "nvfp4": "emulated"}
    fp8 = "native" if targets.has(target, "fp8") else f"no: FP8 needs sm_{targets.FIRST_SM['fp8']} or newer"
    nvfp4 = ("native" if targets.has(target, "nvfp4") else "emulated (quality preview)" if targets.has(target, "fp8")
             else f"no: needs sm_{targets.FIRST_SM['fp8']} or newer")
    return {"fp32": "native", "bf16": "native", "fp8": fp8, "nvfp4": nvfp4}


def report() -> list[tuple[str, str]]:
    """(topic, finding) lines."""
    machine, software = machine_info(), software_info()
    target = targets.local_target()
    if machine["gpu"]:
        gpu = f"{machine['gpu']} ({target}, {machine['memory_gib']:.0f} GiB, driver {machine.get('driver') or '?'})"
    else:
        gpu = f"none: CPU only ({machine['cpu'] or 'unknown CPU'}, {machine['cores']} cores); builds --target cpu"
    lines = [("GPU", gpu),
             ("software", ", ".join(f"{k} {v}" for k, v in software.items() if v is not None))]
    lines += [(f"precision {p}", how) for p, how in precisions(target).items()]
    fp8_attention = targets.has(target, "cudnn_attention") and _has("cudnn")
    lines += [
        ("fp8 attention", "yes (cuDNN FP8 SDPA)" if fp8_attention else
         "no: needs sm_90+ and the nvidia-cudnn-frontend package (pip install -e '.[fp8-attention]')"),
        ("fp8 attention, FlashAttention-3", "yes (fp8_attention_kernel 'flash3')" if target != "cpu" and
         flash3_available(torch.device("cuda")) else
         "no: needs sm_90 and flash-attention's Hopper package (flash_attn_3)"),
        ("backend inductor", "yes (standalone_compile, the default)"),
        ("compiler extras", "yes" if _has("diffusers") and _has("transformers") else
         "no: fluxc build needs diffusers and transformers (pip install -e '.[compiler]'); running engines does not"),
        ("onnx", "yes" if _has("onnx") else "no (pip install onnx)"),
        ("onnxruntime", "yes" if _has("onnxruntime") else "no (pip install onnxruntime)"),
        ("TensorRT", f"yes ({_version('tensorrt')}): --backend tensorrt builds plans" if _has("tensorrt") else
         "no: --backend tensorrt is refused; --backend onnx writes the checked ONNX models TensorRT builds from"),
        ("other targets", "--stage plan writes a portable plan for any target; finish it there with --from"),
    ]
    return lines
