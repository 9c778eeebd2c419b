"""The tiny fp32 engine against diffusers (the independent reference), on CPU."""

import pytest
import torch
from conftest import TINY_PROFILES, TINY_TEXT, random_embeddings

from fluxc.frontend.components import diffusers_pipeline
from fluxc.numerics import assert_close_report
from fluxc.runtime.core import flux_math
from fluxc.runtime.core.families import FAMILIES
from fluxc.runtime.core.profile import Profile


def _transformer_inputs(profile, seed):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, profile.image_tokens, 64, generator=g),
                encoder_hidden_states=torch.randn(1, TINY_TEXT, 64, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g),
                timestep=torch.rand(1, generator=g), guidance=torch.full((1,), 3.5))


@pytest.mark.parametrize("height,width", TINY_PROFILES)
def test_engine_transformer_equals_diffusers(tiny_engine, tiny_fp32, height, width):
    profile = tiny_engine.profile_for(height, width)
    x = _transformer_inputs(profile, seed=height)
    ids = FAMILIES["flux1"].position_ids(profile)
    with torch.no_grad():
        expected = tiny_fp32.module(**x, txt_ids=ids[:TINY_TEXT], img_ids=ids[TINY_TEXT:], return_dict=False)[0]
    cos, sin = tiny_engine.rope(profile)
    got = tiny_engine.transformer(profile, dict(x, rope_cos=cos, rope_sin=sin))
    assert_close_report(got, expected, name=f"noise prediction {height}x{width}", rtol=1e-4)


@pytest.mark.parametrize("height,width,seed", [(144, 112, 5), (128, 96, 11)])
def test_latents_after_8_steps_equal_flux_pipeline(tiny_engine, tiny_fp32, height, width, seed):
    pe, pooled = random_embeddings(seed=seed)
    ref = diffusers_pipeline(tiny_fp32.module)(
        prompt_embeds=pe, pooled_prompt_embeds=pooled, height=height, width=width, num_inference_steps=8,
        guidance_scale=3.5, generator=torch.Generator().manual_seed(seed), output_type="latent").images
    got = tiny_engine.denoise(pe, pooled, height=height, width=width, steps=8, guidance=3.5, seed=seed)
    assert (got - ref).abs().max() <= 1e-3
    assert_close_report(got, ref, name="latents after 8 steps", rtol=1e-4)


def test_rope_tables_equal_diffusers_pos_embed(tiny_fp32):
    profile = Profile(144, 112, TINY_TEXT)
    ids = FAMILIES["flux1"].position_ids(profile)
    cos, sin = flux_math.rope_tables(ids, (16, 56, 56))
    ref_cos, ref_sin = tiny_fp32.module.pos_embed(ids)
    assert torch.allclose(cos, ref_cos, atol=1e-6) and torch.allclose(sin, ref_sin, atol=1e-6)


@pytest.mark.parametrize("steps,tokens", [(1, 64), (8, 63), (28, 4096)])
def test_sigmas_equal_diffusers_scheduler(steps, tokens):
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(tokens))
    assert torch.allclose(FAMILIES["flux1"].sigmas(steps, tokens), sched.sigmas, atol=1e-6)


def test_pack_unpack_roundtrip_matches_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 18, 14)
    packed = flux_math.pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 18, 14))
    assert torch.equal(flux_math.unpack_latents(packed, 144, 112), x)
