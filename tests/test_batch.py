"""Engines with a static batch > 1 give, per prompt and seed, the images a batch-1 engine gives."""

import pytest
import torch

from conftest import assert_batches_match, build_tiny_pipeline


@pytest.fixture(scope="module")
def tiny_pipeline_b2(tmp_path_factory, tiny_pipeline_dir):
    from fluxc.runtime import Engine

    return Engine.load(build_tiny_pipeline(tiny_pipeline_dir, str(tmp_path_factory.mktemp("engines") / "tiny-b2.fluxe"),
                                           batch=2))


def test_batch_2_engine_matches_batch_1(tiny_pipeline_b2, tiny_pipeline_engine):
    assert_batches_match(tiny_pipeline_b2, tiny_pipeline_engine, rtol=1e-4)


def test_batch_4_engine_matches_batch_1(tiny_pipeline_b4_path, tiny_pipeline_engine):
    from fluxc.runtime import Engine

    assert_batches_match(Engine.load(tiny_pipeline_b4_path), tiny_pipeline_engine, rtol=1e-4)


def test_one_seed_per_prompt_draws_each_prompts_noise_alone(tiny_pipeline_engine):
    """As FluxPipeline with a list of generators: seeds [a, b] give image 2 the noise seed b gives alone, unlike
    one seed for the list (one draw for both)."""
    from fluxc.runtime.core.errors import FluxcError

    prompts, args = ["a cat", "a dog"], dict(steps=2, output_type="pt")
    listed = tiny_pipeline_engine.generate(prompts, seed=[5, 6], **args)
    assert torch.equal(listed[1:], tiny_pipeline_engine.generate("a dog", seed=6, **args))
    assert not torch.equal(listed[1:], tiny_pipeline_engine.generate(prompts, seed=5, **args)[1:])
    with pytest.raises(FluxcError, match="2 seeds or generators were given for 1 prompts"):
        tiny_pipeline_engine.generate("a cat", seed=[1, 2], **args)
