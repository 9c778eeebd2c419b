"""Static FP8 calibration (`fluxc build --calibrate N`): the largest |input| each block linear sees.

The eager model runs N short denoising loops (the Euler loop FluxPipeline / Flux2Pipeline runs,
CALIBRATION_STEPS steps at the first profile, guidance 3.5), each from its own seeded noise and prompt
embeddings, with a forward pre-hook on every linear in the double and single blocks. Prompt embeddings: the engine's own text
encoders over N prompts from PROMPTS when the build has them, else seeded random embeddings (a
transformer-only build has no encoders; say so in the manifest). quantize_fp8 turns each amax into a
static per-tensor activation scale (amax / 448) stored in the engine per layer, in place of per-token
scales computed at run time. The first double and single block's inputs at the middle step of the first
sample are kept as those segments' example activations: the build checks the compiled segments on
layer 0's weights, and a static scale is only as good as the activations it is checked on.
"""

import torch

from fluxc.ir import AMAX_SUFFIX
from fluxc.runtime.core import flux_math
from fluxc.runtime.core.families import FAMILIES
from fluxc.runtime.core.profile import Profile

CALIBRATION_STEPS = 8
PROMPTS = ("a photo of an astronaut riding a horse on the moon", "a bowl of ramen on a wooden table, steam rising",
           "a watercolor painting of a lighthouse at dawn", "portrait of an old fisherman, dramatic light",
           "a city street at night in the rain, neon signs", "a red fox in fresh snow, telephoto",
           "an isometric illustration of a tiny island village", "macro photo of a dew-covered spider web")
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
MODULATIONS = ("temb", "temb_mod_img", "temb_mod_txt", "temb_mod")


def _embeddings(model, comps, profile: Profile, n: int, device, dtype):
    """[(prompt embeddings [1, T, D], pooled [1, P] or None for FLUX.2)] for n calibration samples, and where
    they came from."""
    cfg, pooled = model.config, FAMILIES[model.family].pooled
    if comps is None:
        g = torch.Generator().manual_seed(1234)
        draw = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)
        return [(draw(1, profile.text_tokens, cfg["joint_attention_dim"]),
                 draw(1, cfg["pooled_projection_dim"]) if pooled else None) for _ in range(n)], \
            "seeded random prompt embeddings (transformer-only build)"
    from fluxc.frontend.components import diffusers_pipeline

    pipe = diffusers_pipeline(model.module, comps)
    out = []
    for i in range(n):
        prompt = PROMPTS[i % len(PROMPTS)]
        if pooled:
            embeds, pooled_embeds, _ = pipe.encode_prompt(prompt, prompt_2=None,
                                                          max_sequence_length=profile.text_tokens)
            out.append((embeds.to(device, dtype), pooled_embeds.to(device, dtype)))
        else:  # Flux2Pipeline: the hidden states of the layers the engine's encoder segment stacks
            embeds = pipe.encode_prompt(prompt, max_sequence_length=profile.text_tokens,
                                        text_encoder_out_layers=comps.text_layers)[0]
            out.append((embeds.to(device, dtype), None))
    return out, f"the engine's text encoders over {n} built-in prompts"


def _as_example(kind: str, kwargs: dict) -> dict[str, torch.Tensor]:
    """A block's forward kwargs as its traced segment's activation inputs (compiler/frontend/trace.py): the streams,
    the block's modulation input (FLUX.1 temb; FLUX.2 temb_mod_img/txt, temb_mod) and the RoPE tables."""
    cos, sin = kwargs["image_rotary_emb"]
    rest = {k: kwargs[k] for k in MODULATIONS if kwargs.get(k) is not None} | dict(rope_cos=cos.float(),
                                                                                  rope_sin=sin.float())
    if kind == "double":
        return dict(hidden_states=kwargs["hidden_states"], encoder_hidden_states=kwargs["encoder_hidden_states"], **rest)
    text = kwargs.get("encoder_hidden_states")  # FLUX.2's single blocks get the joint sequence already
    joint = kwargs["hidden_states"] if text is None else torch.cat([text, kwargs["hidden_states"]], 1)
    return dict(joint_hidden_states=joint, **rest)


@torch.no_grad()
def calibrate(model, comps, profile: Profile, samples: int, device, dtype):
    """({f"{linear}.weight{AMAX_SUFFIX}": amax as a 0-d f32 tensor} over every block linear,
    {"double" | "single": example activations}, a description)."""
    module, cfg = model.module, model.config
    amax: dict[str, float] = {}
    examples: dict[str, dict] = {}
    capture = [False]

    def keep(kind):
        def record(_, args, kwargs):
            if capture[0] and kind not in examples:
                examples[kind] = _as_example(kind, dict(zip(("hidden_states", "encoder_hidden_states", "temb"), args))
                                             | kwargs)
        return record

    def hook(name):
        def record(_, args):
            amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().max()))
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith(BLOCKS)]
    handles += [blocks[0].register_forward_pre_hook(keep(kind), with_kwargs=True)
                for kind, blocks in (("double", module.transformer_blocks), ("single", module.single_transformer_blocks))]
    family = FAMILIES[model.family]
    ids = family.position_ids(profile).to(device)
    embeddings, source = _embeddings(model, comps, profile, samples, device, dtype)
    sig = family.sigmas(CALIBRATION_STEPS, profile.image_tokens)
    guidance = torch.full((1,), 3.5, device=device) if cfg["guidance_embeds"] else None
    try:
        for i, (embeds, pooled) in enumerate(embeddings):
            z = family.initial_noise(1, profile, cfg["in_channels"], i, dtype).to(device)
            text = dict(encoder_hidden_states=embeds) | ({"pooled_projections": pooled} if pooled is not None else {})
            for step in range(CALIBRATION_STEPS):
                capture[0] = i == 0 and step == CALIBRATION_STEPS // 2
                t = (sig[step] * 1000).to(dtype) / 1000  # rounded as FluxPipeline rounds it
                v = module(hidden_states=z, **text, timestep=t.reshape(1).to(device), guidance=guidance,
                           txt_ids=ids[:profile.text_tokens], img_ids=ids[profile.text_tokens:], return_dict=False)[0]
                z = flux_math.euler_step(z, v.float(), sig[step + 1] - sig[step])
    finally:
        for h in handles:
            h.remove()
    amaxes = {f"{name}.weight{AMAX_SUFFIX}": torch.tensor(a, device=device) for name, a in amax.items()}
    return amaxes, examples, f"{samples} samples x {CALIBRATION_STEPS} steps at {profile.height}x{profile.width}; {source}"
