"""`fluxc adapter ENGINE LORA.safetensors -o NAME.fluxa`: a LoRA as people publish it -> an adapter file the
runtime applies without diffusers (fluxc.runtime.adapters).

The file is read by diffusers' own FLUX LoRA loading (`FluxPipeline.lora_state_dict`, `Flux2Pipeline`'s for
FLUX.2), which recognises and converts diffusers/PEFT, kohya (sd-scripts), XLabs, BFL and the other layouts it
knows; each linear's scale (alpha / r, with the file's rank and alpha patterns or its PEFT metadata) is the one
diffusers' `load_lora_weights` gives PEFT (diffusers' `_create_lora_config`, PEFT's pattern match), and is folded
into the up factor. Only transformer linears are carried: text-encoder parts, LoRA biases and DoRA are refused,
as is any linear the engine does not have or has in another shape.

One known trap is handled here: diffusers 0.42.1's kohya converter splits a single block's fused `linear1` LoRA at
FLUX.1-dev's widths (3072, 3072, 3072, 12288) and asserts on any other. For another width the converter runs
with the widths read from the engine (its single block's q, k, v and MLP rows), put in place of that one constant.
"""

import os
import types
from contextlib import contextmanager

import torch

from fluxc import __version__
from fluxc.runtime.adapters import Adapter, check_adapter, engine_linears, write_adapter
from fluxc.runtime.core.bundle import check_writable, file_digest, read_manifest
from fluxc.runtime.core.errors import FluxcError

FLUX1_DEV_SPLIT = (3072, 3072, 3072, 12288)
_LORA_KEYS = (".lora_A.weight", ".lora_B.weight")


def make_adapter(engine: str, lora: str, output: str) -> dict:
    """Convert `lora` for the model of `engine` and write it to `output`; returns the adapter's manifest."""
    manifest = read_manifest(engine)
    family, linears = manifest["model"]["family"], engine_linears(manifest)
    if not os.path.isfile(lora):
        raise FluxcError(f"No LoRA file at '{lora}'.", "Pass the .safetensors file the LoRA was published as.")
    check_writable(output)
    state_dict, alphas, metadata = _lora_state_dict(family, linears, lora)
    factors, ranks = _factors(state_dict, alphas, metadata, lora)
    entry = {"family": family, "source": {"file": os.path.basename(lora), "blake3": file_digest(lora)},
             "ranks": sorted(set(ranks)), "linears": len(factors), "fluxc_version": __version__}
    check_adapter(Adapter(os.path.basename(output), entry, factors), family, linears)
    write_adapter(output, factors, entry)
    return entry


def _lora_state_dict(family: str, linears: dict, path: str):
    """(diffusers-format state dict, network alphas or None, PEFT metadata or None), from diffusers' loader."""
    from diffusers import Flux2Pipeline, FluxPipeline

    try:
        if family == "flux2":
            state_dict, metadata = Flux2Pipeline.lora_state_dict(path, return_lora_metadata=True)
            return state_dict, None, metadata
        with _kohya_split(linears):
            return FluxPipeline.lora_state_dict(path, return_alphas=True, return_lora_metadata=True)
    except FluxcError:
        raise
    except Exception as e:  # diffusers' own message says what it could not read
        raise FluxcError(f"diffusers could not read '{path}' as a {family} LoRA: {type(e).__name__}: {e}",
                         "Pass a LoRA in a layout diffusers loads (diffusers/PEFT, kohya, XLabs, BFL).") from None


@contextmanager
def _kohya_split(linears: dict):
    """Run diffusers' kohya FLUX.1 converter with this model's single-block split (module docstring)."""
    from diffusers.loaders import lora_pipeline

    try:
        split = tuple(linears[f"single_transformer_blocks.0.{m}"][0] for m in ("attn.to_q", "attn.to_k", "attn.to_v",
                                                                                  "proj_mlp"))
    except KeyError:  # no single blocks: nothing to split
        split = FLUX1_DEV_SPLIT
    original = lora_pipeline._convert_kohya_flux_lora_to_diffusers
    if split == FLUX1_DEV_SPLIT:
        yield
        return
    lora_pipeline._convert_kohya_flux_lora_to_diffusers = _with_constant(original, FLUX1_DEV_SPLIT, split)
    try:
        yield
    finally:
        lora_pipeline._convert_kohya_flux_lora_to_diffusers = original


def _with_constant(fn, old: tuple, new: tuple):
    """fn with the constant `old` replaced by `new` in the code of its nested functions."""
    found = []

    def replaced(code: types.CodeType) -> types.CodeType:
        consts = []
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                c = replaced(c)
            elif c == old:
                found.append(code.co_name)
                c = new
            consts.append(c)
        return code.replace(co_consts=tuple(consts))

    code = replaced(fn.__code__)
    if not found:
        raise FluxcError(f"This diffusers' kohya converter no longer holds FLUX.1-dev's split {old}, which fluxc "
                         f"replaces by this model's {new}.", "Use diffusers 0.42.1 (fluxc's pinned version).")
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _factors(state_dict: dict, alphas, metadata, path: str) -> tuple[dict, list[int]]:
    """module -> (down, up * scale) for the transformer's linears; the ranks."""
    from diffusers.utils.peft_utils import _create_lora_config
    from peft.utils.other import get_pattern_key

    others = sorted({k.split(".")[0] for k in state_dict if not k.startswith("transformer.")})
    if others:
        raise FluxcError(f"'{path}' also changes {', '.join(others)}; fluxc applies adapters to the transformer only "
                         "(its text encoders are compiled with their weights).",
                         "Use the LoRA's transformer part (most FLUX LoRAs have only that).")
    sd = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    unknown = sorted(k for k in sd if not k.endswith(_LORA_KEYS))
    if unknown:
        raise FluxcError(f"'{path}' holds {unknown[0]}, which is not a LoRA factor (LoRA biases, DoRA magnitudes and "
                         "LoKr are not supported).", "Use a plain LoRA (lora_A / lora_B factors only).")
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    missing = [m for m in modules if any(m + k not in sd for k in _LORA_KEYS)]
    if missing:
        raise FluxcError(f"'{path}' has only one of the two LoRA factors of {missing[0]}.", "The file is incomplete.")
    alphas = {k.removeprefix("transformer."): v for k, v in (alphas or {}).items() if k.startswith("transformer.")}
    if metadata is not None:
        metadata = {k.removeprefix("transformer."): v for k, v in metadata.items() if k.startswith("transformer.")}
    rank = {f"^{k}": v.shape[1] for k, v in sd.items() if k.endswith(".lora_B.weight")}
    config = _create_lora_config(sd, alphas or None, metadata or None, rank)  # as diffusers' load_lora_adapter
    factors, ranks = {}, []
    for m in modules:
        down, up = sd[m + ".lora_A.weight"], sd[m + ".lora_B.weight"]
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), m), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), m), config.lora_alpha)
        scale = alpha / (r ** 0.5 if config.use_rslora else r)
        factors[m] = (down.contiguous(), up.float() * scale if scale != 1 else up.contiguous())  # f32: no rounding
        ranks.append(down.shape[0])
    return factors, ranks
