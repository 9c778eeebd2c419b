"""Cache points: fluxc's FBCache against diffusers' apply_first_block_cache, TeaCache against the TeaCache
authors' FLUX forward (re-stated here over diffusers' modules), threshold 0 against the no-cache loop."""

import copy
import types

import numpy as np
import pytest
import torch
from conftest import random_embeddings

from fluxc.frontend.components import diffusers_pipeline
from fluxc.runtime import FluxcError
from fluxc.runtime.core.cache_config import CacheConfig

SIZE = dict(height=144, width=112)
STEPS, SEED = 8, 5
# tiny's random weights move the first block's residual by 50-110% of itself per step: these thresholds
# give all-run, mixed and all-skip patterns
FBCACHE_THRESHOLDS = (0.3, 0.6, 0.95, 2.0)
TEACACHE_THRESHOLDS = (0.5, 1.0, 1e6)


def _run_reference(module, pe, pooled, computed_steps: list):
    """diffusers' FluxPipeline to latents; appends the index of every step that ran the whole stack."""
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(len(calls)))
    # the last single block's attention runs only when the whole stack does
    module.single_transformer_blocks[-1].attn.register_forward_hook(lambda *_: computed_steps.append(calls[-1]))
    return diffusers_pipeline(module)(
        prompt_embeds=pe, pooled_prompt_embeds=pooled, num_inference_steps=STEPS, guidance_scale=3.5,
        generator=torch.Generator().manual_seed(SEED), output_type="latent", **SIZE).images


def _run_fluxc(engine, pe, pooled, config):
    report = {}
    latents = engine.denoise(pe, pooled, steps=STEPS, guidance=3.5, seed=SEED, cache_config=config, report=report,
                             **SIZE)
    return latents, report["cache"]["skipped_steps"]


def test_fbcache_decides_as_diffusers_first_block_cache(tiny_engine, tiny_fp32):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    pe, pooled = random_embeddings(seed=SEED)
    patterns = []
    for threshold in FBCACHE_THRESHOLDS:
        module = copy.deepcopy(tiny_fp32.module)
        apply_first_block_cache(module, FirstBlockCacheConfig(threshold=threshold))
        computed = []
        want = _run_reference(module, pe, pooled, computed)
        got, skipped = _run_fluxc(tiny_engine, pe, pooled, CacheConfig("fbcache", threshold))
        assert skipped == [i for i in range(STEPS) if i not in computed], threshold
        assert (got - want).abs().max() <= 1e-3, threshold
        patterns.append(len(skipped))
    assert patterns[0] == 0 and 0 < min(patterns[1:3]) and max(patterns[1:3]) < STEPS - 1 and patterns[3] == STEPS - 1


def _teacache_forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                      guidance, joint_attention_kwargs=None, return_dict=False):
    """TeaCache4FLUX's forward (the published algorithm, float64 decision on the host) over diffusers' modules."""
    hidden_states = self.x_embedder(hidden_states)
    temb = self.time_text_embed(timestep * 1000, guidance * 1000, pooled_projections)
    encoder_hidden_states = self.context_embedder(encoder_hidden_states)
    rotary = self.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    modulated = self.transformer_blocks[0].norm1(hidden_states, emb=temb)[0]
    if self.cnt == 0 or self.cnt == self.num_steps - 1:
        run, self.acc = True, 0.0
    else:
        coefficients = [4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01]
        prev = self.previous_modulated_input
        self.acc += np.poly1d(coefficients)(((modulated - prev).abs().mean() / prev.abs().mean()).item())
        run = self.acc >= self.rel_l1_thresh
        if run:
            self.acc = 0.0
    self.previous_modulated_input = modulated
    self.cnt += 1
    if run:
        before = hidden_states
        for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
            encoder_hidden_states, hidden_states = block(hidden_states=hidden_states, temb=temb,
                                                         encoder_hidden_states=encoder_hidden_states,
                                                         image_rotary_emb=rotary)
        self.previous_residual = hidden_states - before
        self.ran.append(self.cnt - 1)
    else:
        hidden_states = hidden_states + self.previous_residual
    return (self.proj_out(self.norm_out(hidden_states, temb)),)


def test_teacache_decides_as_the_published_flux_forward(tiny_engine, tiny_fp32):
    pe, pooled = random_embeddings(seed=SEED)
    patterns = []
    for threshold in TEACACHE_THRESHOLDS:
        module = copy.deepcopy(tiny_fp32.module)
        module.forward = types.MethodType(_teacache_forward, module)
        module.cnt, module.num_steps, module.rel_l1_thresh, module.acc, module.ran = 0, STEPS, threshold, 0.0, []
        want = diffusers_pipeline(module)(
            prompt_embeds=pe, pooled_prompt_embeds=pooled, num_inference_steps=STEPS, guidance_scale=3.5,
            generator=torch.Generator().manual_seed(SEED), output_type="latent", **SIZE).images
        got, skipped = _run_fluxc(tiny_engine, pe, pooled, CacheConfig("teacache", threshold))
        assert skipped == [i for i in range(STEPS) if i not in module.ran], threshold
        assert (got - want).abs().max() <= 1e-3, threshold
        patterns.append(len(skipped))
    assert 0 < patterns[1] < STEPS - 2 and patterns[2] == STEPS - 2  # the first and last step always run


@pytest.mark.parametrize("policy", ["fbcache", "teacache"])
def test_threshold_zero_skips_nothing_and_equals_no_cache(tiny_engine, policy):
    pe, pooled = random_embeddings(seed=SEED)
    plain = tiny_engine.denoise(pe, pooled, steps=STEPS, seed=SEED, **SIZE)
    got, skipped = _run_fluxc(tiny_engine, pe, pooled, CacheConfig(policy, 0.0))
    assert skipped == [] and torch.equal(got, plain)


def test_knobs_and_forced_schedule(tiny_engine):
    pe, pooled = random_embeddings(seed=SEED)
    _, everything = _run_fluxc(tiny_engine, pe, pooled, CacheConfig("fbcache", 2.0))
    assert everything == list(range(1, STEPS))
    _, warm = _run_fluxc(tiny_engine, pe, pooled, CacheConfig("fbcache", 2.0, warmup_steps=3))
    assert warm == list(range(3, STEPS))
    _, limited = _run_fluxc(tiny_engine, pe, pooled, CacheConfig("fbcache", 2.0, max_consecutive_skips=2))
    assert limited == [1, 2, 4, 5, 7]
    _, forced = _run_fluxc(tiny_engine, pe, pooled, CacheConfig("fbcache", 0.0, schedule=(2, 3, 6)))
    assert forced == [2, 3, 6]


def test_cache_points_are_in_the_manifest(tiny_engine):
    points = tiny_engine.manifest["cache"]
    assert points["cut"] == {"after_kind": "double", "after_layer": "transformer_blocks.0"}
    assert points["probes"]["modulated"] == "double_probe"
    assert tiny_engine.manifest["pass_counts"]["double-144x112"]["insert_cache_points"] == {"probes": 1}
    assert points["config"]["policy"] == "none"  # the default build runs no cache


@pytest.mark.parametrize("config, message", [
    (dict(policy="lru"), "Unknown cache policy"),
    (dict(policy="fbcache", threshold=float("nan")), "finite number"),
    (dict(policy="fbcache", warmup_steps=-1), "warmup"),
    (dict(policy="fbcache", max_consecutive_skips=0), "max-consecutive"),
])
def test_bad_cache_settings_are_clear_errors(config, message):
    with pytest.raises(FluxcError, match=message):
        CacheConfig(**config)


def test_forced_schedule_cannot_skip_the_first_step(tiny_engine):
    pe, pooled = random_embeddings(seed=SEED)
    with pytest.raises(FluxcError, match="step 0 has no cached residual"):
        _run_fluxc(tiny_engine, pe, pooled, CacheConfig("fbcache", schedule=(0, 3)))
    with pytest.raises(FluxcError, match="step 0 has no cached residual"):
        _run_fluxc(tiny_engine, pe, pooled, CacheConfig("fbcache", schedule=(8,)))


def test_build_and_run_cache_flags(tmp_path):
    from click.testing import CliRunner

    from fluxc.cli import main

    engine = str(tmp_path / "cached.fluxe")
    built = CliRunner().invoke(main, ["build", "--model", "tiny", "--target", "cpu", "--precision", "fp32",
                                      "--transformer-only", "--resolution", "144x112", "--text-tokens", "13",
                                      "--cache", "fbcache", "--cache-threshold", "2", "-o", engine])
    assert built.exit_code == 0, built.output
    run = ["run", engine, "--steps", "6", "-o", str(tmp_path / "latents.safetensors")]
    default = CliRunner().invoke(main, run + ["-v"])
    assert default.exit_code == 0, default.output
    assert "cache fbcache (threshold 2): 5 of 6 steps skipped: [1, 2, 3, 4, 5]" in default.output
    forced = CliRunner().invoke(main, run + ["--cache-schedule", "2,4", "-v"])
    assert "2 of 6 steps skipped: [2, 4]" in forced.output
    off = CliRunner().invoke(main, run + ["--cache", "none"])
    assert off.exit_code == 0 and "skipped" not in off.output
    bad = CliRunner().invoke(main, run + ["--cache", "none", "--cache-threshold", "0.1"])
    assert bad.exit_code == 1 and "no cache policy is on" in bad.output
    early = CliRunner().invoke(main, run + ["--cache-schedule", "6"])  # checked before the engine loads
    assert early.exit_code == 1 and "cannot skip step(s) [6] of 6" in early.output


def test_engines_without_cache_points_say_so(tiny_engine_path):
    """An engine from before cache points, and one whose double block had no fused AdaLN (no TeaCache probe)."""
    from fluxc.runtime import Engine

    engine = Engine.load(tiny_engine_path)
    pe, pooled = random_embeddings(seed=SEED)
    engine.manifest = dict(engine.manifest, cache={"mode": "none"})
    with pytest.raises(FluxcError, match="no cache points"):
        _run_fluxc(engine, pe, pooled, CacheConfig("fbcache"))
    engine.manifest = dict(engine.manifest, cache={"cut": {}, "probes": {"modulated": None}, "why_no_probe": "fused?"})
    with pytest.raises(FluxcError, match="no TeaCache probe: fused"):
        _run_fluxc(engine, pe, pooled, CacheConfig("teacache"))


def test_unfused_double_block_gets_no_teacache_probe(tiny_fp32):
    """insert_cache_points on the traced (unfused) double block: no probe, and the reason names fuse_adaln."""
    import dataclasses

    from fluxc.passes.base import PassContext
    from fluxc.passes.pipeline import resolve, run_pipeline
    from fluxc.recipes import RECIPES
    from fluxc.runtime.core.profile import Profile
    from fluxc.frontend.trace import trace_model

    recipe = dataclasses.replace(RECIPES["reference"](), fusion=False)
    double = next(s for s in trace_model(tiny_fp32, [Profile(144, 112, 13)], torch.device("cpu"), torch.float32)
                  if s.kind == "double")
    passes = [p for p in resolve(recipe, "cpu") if p.phase != "lower"]
    result = run_pipeline(double.graph, PassContext(recipe, "cpu", "double"), passes=passes)
    assert result.counts["insert_cache_points"] == {"probes": 0} and "probe" not in result.side
    assert "fuse_adaln off" in result.explain["insert_cache_points"]
