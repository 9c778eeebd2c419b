"""Model sources: where a FLUX transformer comes from.

`load_model(source, ...)` accepts
- a named architecture with seeded random weights (`tiny`, `flux1-dev`, `flux1-schnell`, `flux2-dev`,
  `tiny-flux2`): built on the meta device and filled in place on the target device, so a 12B model
  materialises on a GPU in seconds and is the same for the same seed, device and dtype;
- a local diffusers folder (the pipeline root with `transformer/`, or the `transformer/` folder);
- a Black Forest Labs single-file `.safetensors` checkpoint (FLUX.1 or FLUX.2, original key names), converted with
  diffusers' own converter, its config inferred from tensor shapes.
Weights are read with safetensors only; nothing is unpickled.
"""

import dataclasses
import hashlib
import json
import math
import os

import torch

from fluxc.runtime.core.errors import FluxcError

FLUX1_DEFAULTS = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)

# name -> (family, config overrides, default text tokens)
ARCHITECTURES = {
    # 2 double + 2 single blocks with the real head layout (head dim 128, RoPE axes 16/56/56) and real
    # latent channels; narrow text/pooled widths keep it CPU-fast.
    "tiny": ("flux1", dict(FLUX1_DEFAULTS, num_layers=2, num_single_layers=2, num_attention_heads=2,
                           joint_attention_dim=64, pooled_projection_dim=32), 13),
    "flux1-dev": ("flux1", dict(FLUX1_DEFAULTS), 512),
    "flux1-schnell": ("flux1", dict(FLUX1_DEFAULTS, guidance_embeds=False), 256),
    # FLUX.1 Fill: the image stream takes the noisy latents (64), the masked image's latents (64) and the mask
    # (8 x 8 pixels per latent pixel, packed 2 x 2: 256) side by side, and predicts 64 channels
    "flux1-fill-dev": ("flux1", dict(FLUX1_DEFAULTS, in_channels=384, out_channels=64), 512),
    "tiny-fill": ("flux1", dict(FLUX1_DEFAULTS, num_layers=2, num_single_layers=2, num_attention_heads=2,
                                joint_attention_dim=64, pooled_projection_dim=32, in_channels=384, out_channels=64), 13),
    "flux2-dev": ("flux2", dict(), 512),
    # joint_attention_dim: 3 stacked hidden states of the tiny Mistral text encoder (compiler/frontend/components.py);
    # 48 text tokens hold its chat-formatted prompts (the system message takes about 30)
    "tiny-flux2": ("flux2", dict(num_layers=2, num_single_layers=2, num_attention_heads=2,
                                 joint_attention_dim=96), 48),
}


@dataclasses.dataclass
class LoadedModel:
    family: str  # "flux1" | "flux2"
    module: torch.nn.Module  # a diffusers transformer in eval mode
    config: dict
    source: dict  # what the weights came from; part of the engine's cache key
    default_text_tokens: int


def check_source(source: str) -> str:
    """The kind of model source, "named" | "diffusers" | "single-file", or a FluxcError."""
    if source in ARCHITECTURES:
        return "named"
    if not os.path.exists(source):
        raise FluxcError(
            f"Model '{source}' is not a known architecture and no such path exists.",
            "Check the path, or use one of the named architectures: " + ", ".join(ARCHITECTURES) + ".",
        )
    if os.path.isdir(source):
        return "diffusers"
    if source.endswith(".safetensors"):
        return "single-file"
    raise FluxcError(
        f"'{source}' is neither a diffusers folder nor a .safetensors checkpoint.",
        "Pass a diffusers FLUX folder, a Black Forest Labs .safetensors file, or one of: "
        + ", ".join(ARCHITECTURES) + ".",
    )


def load_model(source: str, *, dtype: torch.dtype, device: torch.device, seed: int = 0) -> LoadedModel:
    load = {"named": _random_model, "diffusers": _diffusers_folder, "single-file": _bfl_single_file}[check_source(source)]
    return load(source, dtype, device, seed)


def weight_bytes(source: str, dtype: torch.dtype) -> int:
    """The transformer's weights in bytes at `dtype`, known before loading anything: counted on the meta device for a
    named architecture, the checkpoint files' size (scaled from bf16) otherwise. A lower bound of what a build holds."""
    kind = check_source(source)
    per = torch.empty((), dtype=dtype).element_size()
    if kind == "named":
        family, overrides, _ = ARCHITECTURES[source]
        with torch.device("meta"):
            module = _model_class(family)(**overrides)
        return sum(p.numel() for p in module.parameters()) * per
    if kind == "single-file":
        files = [source]
    else:
        folder = os.path.join(source, "transformer") if os.path.isdir(os.path.join(source, "transformer")) else source
        files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors")]
    return sum(os.path.getsize(f) for f in files) * per // 2


def _model_class(family: str):
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

    return FluxTransformer2DModel if family == "flux1" else Flux2Transformer2DModel


def _random_model(name: str, dtype, device, seed: int) -> LoadedModel:
    family, overrides, text_tokens = ARCHITECTURES[name]
    cls = _model_class(family)
    with torch.device("meta"):
        module = cls(**overrides)
    # cast on meta, then allocate: allocating first would hold the float32 model on the device (FLUX.2-dev: 128 GB).
    # torch's own to(): diffusers' override warns that the (empty) list of modules kept in float32 is not kept
    module = torch.nn.Module.to(module, dtype).to_empty(device=device)
    buffers = [name for name, _ in module.named_buffers()]
    assert not buffers, f"to_empty left buffers {buffers} uninitialised"
    init_random_(module, seed)
    config = dict(module.config)
    return LoadedModel(family, module.eval(), config, {"kind": "random", "name": name, "seed": seed},
                       text_tokens)


@torch.no_grad()
def init_random_(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter deterministically: matrices ~ N(0, 1/fan_in), norm scales 1, biases small.

    One generator on the parameters' device walks them in name order, so the result depends only on
    (seed, architecture, device type, dtype). Buffers are left as the constructor made them.
    """
    gen = None
    for name, p in sorted(module.named_parameters()):
        if gen is None:
            gen = torch.Generator(p.device).manual_seed(seed)
        if p.ndim >= 2:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
        elif name.endswith("weight"):  # 1-D weights are RMSNorm scales
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)


def _diffusers_folder(path: str, dtype, device, seed: int) -> LoadedModel:
    folder = os.path.join(path, "transformer") if os.path.isdir(os.path.join(path, "transformer")) else path
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FluxcError(
            f"'{path}' has no transformer/config.json.",
            "Pass a diffusers FLUX folder (the pipeline root or its transformer/ folder).",
        )
    try:
        with open(config_path) as f:
            class_name = json.load(f).get("_class_name", "FluxTransformer2DModel")
    except (OSError, json.JSONDecodeError) as e:
        raise FluxcError(f"Cannot read {config_path}: {e}.", "Restore the file from the original model.")
    family = "flux2" if class_name.startswith("Flux2") else "flux1"
    cls = _model_class(family)
    try:
        module = cls.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True, local_files_only=True)
    except Exception as e:  # diffusers raises OSError/ValueError/SafetensorError for bad files
        raise FluxcError(
            f"Cannot load the transformer weights in '{folder}': {type(e).__name__}: {e}".rstrip(".") + ".",
            "Check that the .safetensors shards are complete (re-download or re-copy them).",
        ) from None
    files = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".json")))
    source = {"kind": "diffusers", "path": os.path.abspath(folder), "files": _stat_fingerprint(folder, files)}
    return LoadedModel(family, module.to(device).eval(), dict(module.config), source,
                       ARCHITECTURES[f"{family}-dev"][2])


def _stat_fingerprint(folder: str, files: list[str]) -> str:
    """Cheap identity of checkpoint files (name, size, mtime) for the cache key."""
    h = hashlib.sha256()
    for f in files:
        st = os.stat(os.path.join(folder, f))
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _bfl_single_file(path: str, dtype, device, seed: int) -> LoadedModel:
    from diffusers.loaders import single_file_utils

    state = read_safetensors(path)
    state = {k.removeprefix("model.diffusion_model."): v for k, v in state.items()}
    family = "flux2" if "single_stream_modulation.lin.weight" in state else "flux1"  # FLUX.2's shared modulation
    convert = {"flux1": single_file_utils.convert_flux_transformer_checkpoint_to_diffusers,
               "flux2": single_file_utils.convert_flux2_transformer_checkpoint_to_diffusers}[family]
    infer = {"flux1": infer_flux1_config, "flux2": infer_flux2_config}[family]
    config = infer(state, path)
    converted = convert(state)
    with torch.device("meta"):
        module = _model_class(family)(**config)
    try:
        module.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as e:
        name = FAMILY_NAMES[family]
        raise FluxcError(f"'{path}' does not match a {name} transformer: {e}", f"Pass a {name} checkpoint.")
    module = module.to(device=device, dtype=dtype).eval()
    source = {"kind": "bfl-single-file", "path": os.path.abspath(path),
              "files": _stat_fingerprint(os.path.dirname(os.path.abspath(path)), [os.path.basename(path)])}
    return LoadedModel(family, module, dict(module.config), source, ARCHITECTURES[f"{family}-dev"][2])


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # SafetensorError, OSError: a truncated or foreign file
        raise FluxcError(
            f"'{path}' is not a readable safetensors file ({type(e).__name__}: {e}).",
            "The file is corrupt or truncated: copy it again from its source.",
        ) from None


FAMILY_NAMES = {"flux1": "FLUX.1", "flux2": "FLUX.2"}


def _require(state: dict, path: str, family: str, names: list[str]) -> None:
    missing = [k for k in names if k not in state]
    if missing:
        name = FAMILY_NAMES[family]
        raise FluxcError(f"'{path}' lacks {name} tensors {missing[:3]}.",
                         f"Pass a Black Forest Labs {name} transformer checkpoint.")


def _blocks(state: dict, prefix: str) -> int:
    """How many blocks a BFL checkpoint holds under prefix ("double_blocks.18.img_attn..." -> 19)."""
    return 1 + max((int(k.split(".")[1]) for k in state if k.startswith(prefix)), default=-1)


def _shape_config(state: dict[str, torch.Tensor]) -> dict:
    """The config entries both families read the same way off BFL tensor shapes."""
    inner_dim, in_channels = state["img_in.weight"].shape
    head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    return dict(in_channels=in_channels, out_channels=state["final_layer.linear.weight"].shape[0],
                num_layers=_blocks(state, "double_blocks."), num_single_layers=_blocks(state, "single_blocks."),
                attention_head_dim=head_dim, num_attention_heads=inner_dim // head_dim,
                joint_attention_dim=state["txt_in.weight"].shape[1],
                guidance_embeds="guidance_in.in_layer.weight" in state)


def infer_flux1_config(state: dict[str, torch.Tensor], path: str) -> dict:
    """FLUX.1 config from BFL tensor shapes (the checkpoint carries no config)."""
    _require(state, path, "flux1", ["img_in.weight", "txt_in.weight", "vector_in.in_layer.weight",
                                    "double_blocks.0.img_attn.norm.query_norm.scale", "final_layer.linear.weight"])
    inner_dim = state["img_in.weight"].shape[0]
    if inner_dim != 3072:
        raise FluxcError(f"'{path}' has inner dim {inner_dim}; diffusers' converter supports only 3072.",
                         "Convert the checkpoint to a diffusers folder and pass that instead.")
    return dict(FLUX1_DEFAULTS, **_shape_config(state),
                pooled_projection_dim=state["vector_in.in_layer.weight"].shape[1])


def infer_flux2_config(state: dict[str, torch.Tensor], path: str) -> dict:
    """FLUX.2 config from BFL tensor shapes. RoPE axes and theta are not in the weights: they keep diffusers'
    Flux2Transformer2DModel defaults (FLUX.2-dev's, 4 x 32 and 2000)."""
    _require(state, path, "flux2", ["img_in.weight", "txt_in.weight", "time_in.in_layer.weight",
                                    "double_blocks.0.img_attn.norm.query_norm.scale",
                                    "double_blocks.0.img_mlp.0.weight", "final_layer.linear.weight"])
    inner_dim = state["img_in.weight"].shape[0]
    return dict(_shape_config(state), timestep_guidance_channels=state["time_in.in_layer.weight"].shape[1],
                mlp_ratio=state["double_blocks.0.img_mlp.0.weight"].shape[0] / (2 * inner_dim))  # SwiGLU: gate, value
