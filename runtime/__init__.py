"""The minimal fluxc runtime: `Engine.load(path).generate(prompt)`. Needs torch, safetensors, tokenizers and pillow."""

from fluxc.runtime.engine import Engine
from fluxc.runtime.errors import FluxcError
from fluxc.runtime.flux_math import Profile

__all__ = ["Engine", "FluxcError", "Profile"]
