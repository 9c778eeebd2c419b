"""Loading saved segment artifacts, one loader per backend name (the compile side is in fluxc.backends)."""

import os

import torch

from fluxc.runtime import kernels, nvfp4  # noqa: F401  (segments call torch.ops.fluxc.*; register them before loading)
from fluxc.runtime.errors import FluxcError

INDUCTOR_ARTIFACT = "artifact.bin"


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


LOADERS = {"inductor": load_inductor}
