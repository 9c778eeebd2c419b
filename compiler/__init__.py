"""fluxc: an ahead-of-time compiler for FLUX diffusion transformers.

This module stays import-light on purpose: `import fluxc.runtime` imports it first, and production
runtimes must not pull in diffusers or the compiler.
"""

__version__ = "0.1.0"
FORMAT_VERSION = 3  # engine bundle format; the runtime refuses any other (2: text encoders, VAE, tokenizers;
#                    3: fused weights, single blocks over the joint text+image sequence)
