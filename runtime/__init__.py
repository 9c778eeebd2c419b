"""The minimal fluxc runtime: `Engine.load(path).generate(prompt)`. Needs torch, safetensors, tokenizers and pillow.

    core/       the shared core every layer stands on: errors, targets, Profile, families, the bundle format,
                cache settings (no torch in errors, targets' table or cache settings: the CLI parses without it)
    ops/        fluxc's torch ops: fused kernels, NVFP4, Ulysses collectives, ONNX reference ops
    engine      load a verified engine; generate / encode / denoise / decode
    loop        the denoising step as CUDA-graphed pieces, clocks, batching
    cache       First Block Cache and TeaCache decisions on the GPU
    loaders     one loader per backend's saved segments
    text        prompt tokenization as the diffusers pipelines do it
    parallel    context parallelism: process group, sharding, launching ranks
    __main__    `python -m fluxc.runtime` (and `torchrun -m fluxc.runtime`): prompts to images without the CLI

Engine is imported on first use (PEP 562), so `import fluxc.runtime.core.errors` does not import torch.
"""

__all__ = ["Engine", "FluxcError", "Profile"]


def __getattr__(name: str):
    if name == "Engine":
        from fluxc.runtime.engine import Engine

        return Engine
    if name == "FluxcError":
        from fluxc.runtime.core.errors import FluxcError

        return FluxcError
    if name == "Profile":
        from fluxc.runtime.core.profile import Profile

        return Profile
    raise AttributeError(f"module 'fluxc.runtime' has no attribute {name!r}")
