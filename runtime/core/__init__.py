"""The shared core: what the runtime, the compiler, the passes and the recipes all stand on.

    errors      FluxcError, the one user-facing error type
    targets     the target names (cpu, sm_XY) and one table of what each SM can do
    profile     Profile: one static shape an engine is compiled for
    flux_math   family-independent FLUX math: latent packing, RoPE tables, the shifted schedule, the Euler step
    families    FLUX.1 and FLUX.2 as classes that own every difference between them
    bundle      the engine bundle on disk: format version, manifest, weights file, verification

Imports torch and the standard library only; nothing here imports another fluxc layer.
"""
