"""Front end: trace a FLUX pipeline into segment graphs (the IR).

The transformer, per resolution profile:
    head    x_embedder, context_embedder, time/guidance/text embedding   -> hidden, encoder, temb
    double  one FluxTransformerBlock (19 in FLUX.1-dev)                  -> encoder, hidden
    single  one FluxSingleTransformerBlock (38 in FLUX.1-dev)            -> joint (text then image tokens)
    tail    norm_out + proj_out                                          -> noise prediction
The other components (unless --transformer-only):
    clip    CLIP-L text model, token ids [B, 77]        -> pooled output [B, 768]   (once per engine)
    t5      T5 encoder, token ids [B, T]                -> hidden states [B, T, 4096] (once per engine)
    vae     scale/shift, VAE decoder, [0, 1] postprocess -> image [B, H, W, 3]     (per profile)
    vae_encoder  VAE encoder (--tasks ...,img2img): image [B, 3, H, W] in [-1, 1] -> the latent distribution's
            mean and standard deviation [B, 16, H/8, W/8]; the runtime samples, scales and noises it (per profile)
    FLUX.2 (the same four transformer kinds, with the wrappers of runtime/core/families.py's FLUX.2 row):
    mistral Mistral3 language model, token ids and mask [B, T] -> hidden states of 3 layers [B, T, 3 x 5120]
    vae     batch-norm de-normalisation, 2x2 unpatchify, VAE decoder, postprocess     (per profile)

Each graph is aten-level torch.fx (make_fx, fake tensors) whose first placeholders are the layer's
weights and whose last are the activations, so one compiled artifact serves every layer of its kind.
RoPE cos/sin tables enter as activations: the runtime computes them once per resolution.
"""

import dataclasses

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fluxc.frontend.components import CLIP_MAX_LENGTH, Flux2Components
from fluxc import ir
from fluxc.ir import WeightSource
from fluxc.frontend.models import LoadedModel
from fluxc.runtime.core.cache_config import PROBE_SUFFIX
from fluxc.runtime.core.families import ENCODER_KINDS, FAMILIES, SEGMENT_KINDS
from fluxc.runtime.core.profile import Profile
from fluxc.runtime.core.schema import IMAGE_TASKS

PER_ENGINE = ENCODER_KINDS  # the text encoders: shapes independent of the resolution, traced once (profile None)
COMPONENT_KINDS = PER_ENGINE + ("vae", "vae_encoder")


@dataclasses.dataclass
class Segment:
    """One traced graph and how the runtime feeds it."""

    kind: str
    profile: Profile | None  # None for segments shared by all profiles (the text encoders)
    graph: torch.fx.GraphModule
    weight_names: list[str]  # relative to each layer prefix, in placeholder order (refreshed after the passes)
    layers: list[str]  # state-dict prefixes of the layers this graph runs for ("" = top level)
    example: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict, repr=False)  # traced with these
    schedule: "Segment | None" = None  # the graph hoist_schedule split off this one: its outputs feed this one
    # diffusers eager's outputs on the example, one dict per check run (compiler/build.py: the numerics check)
    expected: list[dict[str, torch.Tensor]] = dataclasses.field(default_factory=list, repr=False)
    traced_outputs: list[str] = dataclasses.field(default_factory=list)  # the eager module's, in its order

    @property
    def inputs(self) -> list[str]:
        """Activation input names (the placeholders after the weights), as the graph has them now."""
        return [n.name for n in self.graph.graph.nodes if n.op == "placeholder" and "weight" not in n.meta]

    @property
    def outputs(self) -> list[str]:
        return ir.output_names(self.graph)

    @property
    def device(self) -> torch.device:
        return next(iter(self.example.values())).device

    @property
    def name(self) -> str:
        return self.kind if self.profile is None else f"{self.kind}-{self.profile.name}"


class _Head(torch.nn.Module):
    """The start of FluxTransformer2DModel.forward, up to the first block."""

    def __init__(self, model):
        super().__init__()
        self.x_embedder = model.x_embedder
        self.context_embedder = model.context_embedder
        self.time_text_embed = model.time_text_embed
        self.guidance_embeds = model.config.guidance_embeds

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance=None):
        hidden_states = self.x_embedder(hidden_states)
        timestep = timestep.to(hidden_states.dtype) * 1000
        if self.guidance_embeds:
            guidance = guidance.to(hidden_states.dtype) * 1000
            temb = self.time_text_embed(timestep, guidance, pooled_projections)
        else:
            temb = self.time_text_embed(timestep, pooled_projections)
        return hidden_states, self.context_embedder(encoder_hidden_states), temb


class _Tail(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.norm_out = model.norm_out
        self.proj_out = model.proj_out

    def forward(self, hidden_states, temb):
        return self.proj_out(self.norm_out(hidden_states, temb))


class _Block(torch.nn.Module):
    """A double or single block with RoPE passed as two tensors instead of a tuple."""

    def __init__(self, block):
        super().__init__()
        self.inner = block

    def forward(self, hidden_states, encoder_hidden_states, temb, rope_cos, rope_sin):
        return self.inner(hidden_states, encoder_hidden_states, temb, (rope_cos, rope_sin))


class _SingleJoint(torch.nn.Module):
    """A single block over the joint sequence [B, T + S, C]: the block itself joins text and image tokens
    first and splits them last, so consecutive single blocks pass the joint tensor on (remove_noop_ops
    folds the split-then-join away) and the runtime joins once after the double blocks."""

    def __init__(self, block, text_tokens: int):
        super().__init__()
        self.inner, self.text_tokens = block, text_tokens

    def forward(self, joint_hidden_states, temb, rope_cos, rope_sin):
        t = self.text_tokens
        encoder, hidden = self.inner(joint_hidden_states[:, t:], joint_hidden_states[:, :t], temb, (rope_cos, rope_sin))
        return torch.cat([encoder, hidden], dim=1)


class _Flux2Head(torch.nn.Module):
    """The start of Flux2Transformer2DModel.forward: embeddings, temb and the modulations every block shares."""

    def __init__(self, model):
        super().__init__()
        self.x_embedder, self.context_embedder = model.x_embedder, model.context_embedder
        self.time_guidance_embed = model.time_guidance_embed
        self.double_stream_modulation_img = model.double_stream_modulation_img
        self.double_stream_modulation_txt = model.double_stream_modulation_txt
        self.single_stream_modulation = model.single_stream_modulation
        self.guidance_embeds = model.config.guidance_embeds

    def forward(self, hidden_states, encoder_hidden_states, timestep, guidance=None):
        timestep = timestep.to(hidden_states.dtype) * 1000
        guidance = guidance.to(hidden_states.dtype) * 1000 if self.guidance_embeds else None
        temb = self.time_guidance_embed(timestep, guidance)
        return (self.x_embedder(hidden_states), self.context_embedder(encoder_hidden_states), temb,
                self.double_stream_modulation_img(temb), self.double_stream_modulation_txt(temb),
                self.single_stream_modulation(temb))


class _Flux2Block(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.inner = block

    def forward(self, hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt, rope_cos, rope_sin):
        return self.inner(hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt, (rope_cos, rope_sin))


class _Flux2SingleJoint(_SingleJoint):
    def forward(self, joint_hidden_states, temb_mod, rope_cos, rope_sin):
        return self.inner(joint_hidden_states, None, temb_mod, (rope_cos, rope_sin))


class _ClipPooled(torch.nn.Module):
    """FluxPipeline._get_clip_prompt_embeds after tokenizing: the pooled output at the EOS token."""

    def __init__(self, clip):
        super().__init__()
        self.inner = clip

    def forward(self, input_ids):
        return self.inner(input_ids=input_ids, output_hidden_states=False).pooler_output

    def example(self, profile: Profile, device, dtype) -> dict[str, torch.Tensor]:
        vocab = self.inner.config.vocab_size
        return dict(input_ids=torch.randint(0, vocab, (profile.batch, CLIP_MAX_LENGTH), device=device))


class _T5Hidden(torch.nn.Module):
    """FluxPipeline._get_t5_prompt_embeds after tokenizing: the last hidden states."""

    def __init__(self, t5):
        super().__init__()
        self.inner = t5

    def forward(self, input_ids):
        return self.inner(input_ids=input_ids, output_hidden_states=False)[0]

    def example(self, profile: Profile, device, dtype) -> dict[str, torch.Tensor]:
        vocab = self.inner.config.vocab_size
        return dict(input_ids=torch.randint(0, vocab, (profile.batch, profile.text_tokens), device=device))


class _MistralHidden(torch.nn.Module):
    """Flux2Pipeline._get_mistral_3_small_prompt_embeds after tokenizing: the hidden states after each of
    `layers` stacked per token, [B, T, len(layers) x hidden]. Mistral3's model without its LM head, whole: the
    layers after the last one read (FLUX.2-dev reads 10, 20, 30 of 40) and the vision tower are dead code in the
    graph. (A shallow copy cut after the last layer reported other hidden states: transformers records them
    with hooks on the shared layers.)"""

    def __init__(self, text_encoder, layers: tuple[int, ...], padding_side: str):
        super().__init__()
        self.inner = text_encoder.model
        self.layers, self.padding_side = tuple(layers), padding_side

    def forward(self, input_ids, attention_mask):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        stacked = torch.stack([out.hidden_states[k] for k in self.layers], dim=2)  # [B, T, layers, hidden]
        return stacked.flatten(2)

    def example(self, profile: Profile, device, dtype) -> dict[str, torch.Tensor]:
        """Token ids and a mask padded as the tokenizer pads: a quarter of the tokens are padding."""
        b, t = profile.batch, profile.text_tokens
        mask = torch.ones(b, t, dtype=torch.long, device=device)
        (mask[:, :t // 4] if self.padding_side == "left" else mask[:, t - t // 4:]).zero_()
        ids = torch.randint(0, self.inner.config.text_config.vocab_size, (b, t), device=device)
        return dict(input_ids=ids, attention_mask=mask)


class _VaeDecoder(torch.nn.Module):
    """The VAE decoder both families end with, and the pipelines' postprocess: z -> image [B, H, W, 3] in [0, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.decoder = vae.decoder  # only the decoder's weights enter the graph
        self.post_quant_conv = vae.post_quant_conv if vae.config.use_post_quant_conv else None
        self.latent_channels = vae.config.latent_channels

    def decode(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        image = self.decoder(z)  # [B, 3, H, W] in [-1, 1]
        return (image * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)  # VaeImageProcessor.postprocess


class _VaeDecode(_VaeDecoder):
    """The end of FluxPipeline.__call__ after unpacking: latents [B, 16, H/8, W/8] -> image [B, H, W, 3] in [0, 1]."""

    def __init__(self, vae):
        super().__init__(vae)
        self.scaling, self.shift = vae.config.scaling_factor, vae.config.shift_factor

    def forward(self, latents):
        return self.decode(latents / self.scaling + self.shift)

    def example(self, profile: Profile, device, dtype) -> dict[str, torch.Tensor]:
        return dict(latents=torch.randn(profile.latent_shape(self.latent_channels), device=device, dtype=dtype))


class _Flux2VaeDecode(_VaeDecoder):
    """The end of Flux2Pipeline.__call__ after unpacking: patchified latents [B, 4C, H/16, W/16] -> image: the
    batch-norm statistics put back, each token's 2x2 patch unfolded, then decoded as FLUX.1's."""

    def __init__(self, vae):
        super().__init__(vae)
        bn = vae.bn  # as Flux2Pipeline computes them: in the VAE's dtype
        self.register_buffer("bn_mean", bn.running_mean.detach().clone())
        self.register_buffer("bn_std", torch.sqrt(bn.running_var.detach() + vae.config.batch_norm_eps))

    def forward(self, latents):
        z = latents * self.bn_std.view(1, -1, 1, 1) + self.bn_mean.view(1, -1, 1, 1)
        b, c, h, w = z.shape  # Flux2Pipeline._unpatchify_latents
        z = z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)
        return self.decode(z)

    def example(self, profile: Profile, device, dtype) -> dict[str, torch.Tensor]:
        b, c = profile.batch, 4 * self.latent_channels
        return dict(latents=torch.randn(b, c, profile.height // 16, profile.width // 16, device=device, dtype=dtype))


class _VaeEncoder(torch.nn.Module):
    """The VAE encoder both families' image tasks start from: image [B, 3, H, W] in [-1, 1] -> the moments of
    AutoencoderKL's DiagonalGaussianDistribution, mean and std; subclasses put them in the transformer's scale."""

    def __init__(self, vae):
        super().__init__()
        self.encoder = vae.encoder  # only the encoder's weights enter the graph
        self.quant_conv = vae.quant_conv  # None where the VAE has none

    def moments(self, image):
        h = self.encoder(image)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = torch.chunk(h, 2, dim=1)
        return mean, torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))  # as DiagonalGaussianDistribution

    def example(self, profile: Profile, device, dtype) -> dict[str, torch.Tensor]:
        image = torch.rand(profile.batch, 3, profile.height, profile.width, device=device) * 2 - 1
        return dict(image=image.to(dtype))


class _VaeEncode(_VaeEncoder):
    """FLUX.1: the mean and std in the transformer's latent scale ((z - shift) * scaling is affine, so sampling
    mean + std * eps after it is FluxImg2ImgPipeline's sample-then-scale). The runtime draws the sample from the
    request's generator."""

    def __init__(self, vae):
        super().__init__(vae)
        self.scaling, self.shift = vae.config.scaling_factor, vae.config.shift_factor

    def forward(self, image):
        mean, std = self.moments(image)
        return (mean - self.shift) * self.scaling, std * self.scaling


class _Flux2VaeEncode(_VaeEncoder):
    """Flux2Pipeline._encode_vae_image without the draw: the encoder's mean (argmax), 2x2 patchified and normalized by
    the VAE's batch-norm statistics -> [B, 4C, H/16, W/16], the transformer's latent grid (std likewise, unused)."""

    def __init__(self, vae):
        super().__init__(vae)
        bn = vae.bn
        self.register_buffer("bn_mean", bn.running_mean.detach().clone())
        self.register_buffer("bn_std", torch.sqrt(bn.running_var.detach() + vae.config.batch_norm_eps))

    @staticmethod
    def _patchify(z):  # Flux2Pipeline._patchify_latents
        b, c, h, w = z.shape
        return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)

    def forward(self, image):
        mean, std = self.moments(image)
        mean_bn, std_bn = self.bn_mean.view(1, -1, 1, 1), self.bn_std.view(1, -1, 1, 1)
        return (self._patchify(mean) - mean_bn) / std_bn, self._patchify(std) / std_bn


_WRAPPERS = {"flux1": (_Head, _Block, _SingleJoint), "flux2": (_Flux2Head, _Flux2Block, _Flux2SingleJoint)}  # head, blocks


def segment_modules(model: LoadedModel, text_tokens: int) -> dict[str, tuple[torch.nn.Module, list[str]]]:
    """kind -> (an eager module of that kind, the state-dict prefixes of every layer it serves)."""
    m = model.module
    head, block, single = _WRAPPERS[model.family]
    return {
        "head": (head(m), [""]),
        "double": (block(m.transformer_blocks[0]), [f"transformer_blocks.{i}" for i in range(len(m.transformer_blocks))]),
        "single": (single(m.single_transformer_blocks[0], text_tokens),
                   [f"single_transformer_blocks.{i}" for i in range(len(m.single_transformer_blocks))]),
        "tail": (_Tail(m), [""]),
    }


def component_modules(comps, tasks=("t2i",)) -> dict[str, tuple[torch.nn.Module, list[str]]]:
    """kind -> (eager wrapper, [weight prefix]) for the text encoders and the VAE (diffusers folder names); with
    img2img or inpaint among the tasks, the VAE encoder too."""
    if isinstance(comps, Flux2Components):
        mistral = _MistralHidden(comps.text_encoder, comps.text_layers, comps.tokenizer.padding_side)
        encoder = {"vae_encoder": (_Flux2VaeEncode(comps.vae), ["vae"])} if set(IMAGE_TASKS) & set(tasks) else {}
        return {"mistral": (mistral, ["text_encoder"]), "vae": (_Flux2VaeDecode(comps.vae), ["vae"])} | encoder
    encoder = {"vae_encoder": (_VaeEncode(comps.vae), ["vae"])} if set(IMAGE_TASKS) & set(tasks) else {}
    return {"clip": (_ClipPooled(comps.clip), ["text_encoder"]), "t5": (_T5Hidden(comps.t5), ["text_encoder_2"]),
            "vae": (_VaeDecode(comps.vae), ["vae"])} | encoder


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a segment wrapper, named as in the wrapped module's own state dict."""
    named = dict(module.named_parameters()) | dict(module.named_buffers())
    return {n.removeprefix("inner."): t for n, t in named.items()}


def example_activations(model: LoadedModel, kind: str, profile: Profile, device, dtype) -> dict[str, torch.Tensor]:
    """Activation inputs of a segment, by name, with the shapes the runtime will feed."""
    cfg = model.config
    b, s, t = profile.batch, profile.local_image_tokens, profile.local_text_tokens  # one rank's share
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    rope = sum(cfg["axes_dims_rope"])

    def new(*shape, dt=dtype):
        return torch.randn(*shape, device=device, dtype=dt)

    family = FAMILIES[model.family]
    if kind == "head":
        acts = dict(hidden_states=new(b, s, cfg["in_channels"]), encoder_hidden_states=new(b, t, cfg["joint_attention_dim"]))
        if family.pooled:
            acts["pooled_projections"] = new(b, cfg["pooled_projection_dim"])
        acts["timestep"] = new(b).abs()
        if cfg["guidance_embeds"]:
            acts["guidance"] = new(b, dt=torch.float32).abs() * 4
        return acts
    rope_tables = dict(rope_cos=new(t + s, rope, dt=torch.float32), rope_sin=new(t + s, rope, dt=torch.float32))
    # the per-step conditioning: FLUX.1 blocks take temb, FLUX.2 blocks the head's modulations (families.py)
    conditioning = {n: new(b, family.conditioning_widths[n] * d) for n in family.schedule_inputs.get(kind, ())}
    if kind == "double":
        return dict(hidden_states=new(b, s, d), encoder_hidden_states=new(b, t, d), **conditioning, **rope_tables)
    if kind == "single":
        return dict(joint_hidden_states=new(b, t + s, d), **conditioning, **rope_tables)
    return dict(hidden_states=new(b, s, d), temb=new(b, d))


SCHEDULE_ROWS = 32  # hoisted graphs run over steps x batch rows, this many at a time

COMPONENT_OUTPUTS = {"clip": ["pooled_prompt_embeds"], "t5": ["prompt_embeds"], "mistral": ["prompt_embeds"],
                     "vae": ["image"], "vae_encoder": ["latent_mean", "latent_std"]}


def trace_segment(module: torch.nn.Module, layers: list[str], kind: str, profile: Profile | None,
                  activations: dict[str, torch.Tensor], outputs: list[str]) -> Segment:
    state = dict(module.named_parameters()) | dict(module.named_buffers())
    weight_names = list(module_tensors(module))
    n_w = len(state)

    def fn(*flat):
        weights = dict(zip(state, flat[:n_w]))
        out = torch.func.functional_call(module, weights, tuple(flat[n_w:]))
        return list(out) if isinstance(out, tuple) else [out]

    with torch.no_grad():
        gm = make_fx(fn, tracing_mode="fake")(*state.values(), *activations.values())
    _name_placeholders(gm, weight_names + list(activations))
    for node, name in zip(gm.graph.nodes, weight_names):
        node.meta["weight"] = WeightSource(name, shape=tuple(node.meta["val"].shape))
    gm.graph.output_node().meta["names"] = list(outputs)
    return Segment(kind, profile, gm, weight_names, layers, activations, traced_outputs=list(outputs))


def schedule_segment(seg: Segment, hoisted, rows: int = SCHEDULE_ROWS) -> Segment:
    """The graph hoist_schedule split off `seg`, re-traced for `rows` rows (the runtime feeds steps x batch
    rows). Example rows: the segment's own example first, then its rows each scaled elementwise by a random
    factor in [0.75, 1.25), so the build's check sees rows that differ but stay like the example (with
    calibrated FP8 scales, rows unlike any real one would saturate)."""
    g = torch.Generator().manual_seed(0)
    acts = {}
    for name in hoisted.inputs:
        x = seg.example[name]
        base = x[torch.arange(rows - x.shape[0]) % x.shape[0]]
        extra = base * (0.75 + 0.5 * torch.rand(base.shape, generator=g)).to(x)
        acts[name] = torch.cat([x, extra])
    placeholders = [n for n in hoisted.graph.graph.nodes if n.op == "placeholder"]
    weights = [n for n in placeholders if "weight" in n.meta]
    with torch.no_grad():
        gm = make_fx(hoisted.graph, tracing_mode="fake")(
            *(torch.empty(n.meta["val"].shape, dtype=n.meta["val"].dtype, device=seg.device) for n in weights),
            *acts.values())
    _name_placeholders(gm, [n.name for n in placeholders])
    for node, old in zip(gm.graph.nodes, weights):
        node.meta["weight"] = old.meta["weight"]
    gm.graph.output_node().meta["names"] = list(hoisted.values)
    return Segment(f"{seg.kind}_schedule", None, gm, [n.meta["weight"].name for n in weights], seg.layers, acts)


def probe_segment(seg: Segment, probe) -> Segment:
    """The cache probe insert_cache_points split off `seg` (a double block), run for its first layer only."""
    weights = [n for n in probe.graph.graph.nodes if n.op == "placeholder" and "weight" in n.meta]
    return Segment(seg.kind + PROBE_SUFFIX, seg.profile, probe.graph, [n.meta["weight"].name for n in weights],
                   seg.layers[:1], {name: seg.example[name] for name in probe.inputs})


def _name_placeholders(gm: torch.fx.GraphModule, names: list[str]) -> None:
    """Readable IR: placeholder `arg0_1` becomes `attn_to_q_weight`."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(names), (len(placeholders), len(names))
    for node, name in zip(placeholders, names):
        node.name = node.target = name.replace(".", "_")
    gm.recompile()


def trace_model(model: LoadedModel, profiles: list[Profile], device, dtype) -> list[Segment]:
    modules = segment_modules(model, profiles[0].local_text_tokens)  # every profile has the same text length
    segments = []
    for profile in profiles:
        for kind in SEGMENT_KINDS:
            module, layers = modules[kind]
            acts = example_activations(model, kind, profile, device, dtype)
            segments.append(trace_segment(module, layers, kind, profile, acts, FAMILIES[model.family].outputs[kind]))
    return segments


def trace_components(comps, profiles: list[Profile], device, dtype, encoder_device, tasks=("t2i",)) -> list[Segment]:
    """The text encoders once (every profile shares batch and text length), the VAE (and its encoder) per profile."""
    segments = []
    for kind, (module, layers) in component_modules(comps, tasks).items():
        for profile in profiles[:1] if kind in PER_ENGINE else profiles:
            acts = module.example(profile, encoder_device if kind in PER_ENGINE else device, dtype)
            segments.append(trace_segment(module, layers, kind, None if kind in PER_ENGINE else profile, acts,
                                          COMPONENT_OUTPUTS[kind]))
    return segments
