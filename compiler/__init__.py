"""fluxc: an ahead-of-time compiler for FLUX diffusion transformers.

This module stays import-light on purpose: `import fluxc.runtime` imports it first, and production
runtimes must not pull in diffusers or the compiler.
"""

__version__ = "0.1.0"  # the engine format version is fluxc.runtime.core.bundle.FORMAT_VERSION
