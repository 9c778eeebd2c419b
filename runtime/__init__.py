"""The minimal fluxc runtime: `Engine.load(path).denoise(...)`. Needs torch and safetensors only."""

from fluxc.runtime.engine import Engine
from fluxc.runtime.errors import FluxcError
from fluxc.runtime.flux_math import Profile

__all__ = ["Engine", "FluxcError", "Profile"]
