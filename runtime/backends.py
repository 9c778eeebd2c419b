"""Loading saved segment artifacts, one loader per backend name (the compile side is in fluxc.backends)."""

import os

import torch

from fluxc.runtime import kernels, nvfp4  # noqa: F401  (segments call torch.ops.fluxc.*; register them before loading)
from fluxc.runtime.errors import FluxcError

INDUCTOR_ARTIFACT = "artifact.bin"
ONNX_MODEL = "segment.onnx"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def backend_versions() -> dict[str, str]:
    """Versions an Inductor artifact is tied to; the runtime refuses an engine built with another torch."""
    return {
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
    }


def load_inductor(segment_dir: str):
    path = os.path.join(segment_dir, INDUCTOR_ARTIFACT)
    try:
        return torch._inductor.CompiledArtifact.load(path=path, format="binary")
    except Exception as e:  # a corrupt artifact passed the hash check only if the manifest lies
        raise FluxcError(f"Cannot load compiled segment {path}: {type(e).__name__}: {e}",
                         "Rebuild the engine with this torch version.") from None


def load_onnx(segment_dir: str):
    """An ONNX Runtime session over the segment's model, called like a compiled segment: tensors in, tensors out.
    bfloat16 inputs go in as ml_dtypes arrays (ONNX Runtime's CPU provider has few bf16 kernels: see the README)."""
    try:
        import onnxruntime
    except ImportError:
        raise FluxcError("This engine's segments are ONNX models; running them needs onnxruntime.",
                         "pip install onnxruntime (or onnxruntime-gpu), or rebuild with --backend inductor.") from None
    path = os.path.join(segment_dir, ONNX_MODEL)
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in onnxruntime.get_available_providers()]
    try:
        session = onnxruntime.InferenceSession(path, providers=providers)
    except onnxruntime.capi.onnxruntime_pybind11_state.NotImplemented as e:
        raise FluxcError(f"ONNX Runtime ({', '.join(providers)}) cannot run segment {path}: {e}",
                         "ONNX Runtime's CPU provider has almost no bfloat16 kernels: build --precision fp32 for "
                         "it, or run the ONNX models with TensorRT.") from None
    names = [i.name for i in session.get_inputs()]

    def run(*tensors: torch.Tensor) -> list[torch.Tensor]:
        feeds = {n: _to_numpy(t) for n, t in zip(names, tensors)}
        return [_from_numpy(a, tensors[0].device) for a in session.run(None, feeds)]

    return run


def _to_numpy(t: torch.Tensor):
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.detach().float().cpu().numpy().astype(ml_dtypes.bfloat16)
    return t.detach().cpu().numpy()


def _from_numpy(a, device: torch.device) -> torch.Tensor:
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.astype("float32")).to(device, torch.bfloat16)
    return torch.from_numpy(a).to(device)


LOADERS = {"inductor": load_inductor, "onnx": load_onnx}
