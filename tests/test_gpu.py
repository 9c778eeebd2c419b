"""GPU checks of the tiny engine (run on the lab GPU by scripts/gpu_tests.sh; skipped without CUDA)."""

import pytest
import torch

from conftest import flux_pipeline, random_embeddings

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny_bf16_cuda(tmp_path_factory):
    from fluxc.build import BuildOptions, build
    from fluxc.runtime import Engine

    path = str(tmp_path_factory.mktemp("gpu") / "tiny-bf16.fluxe")
    build(BuildOptions(model="tiny", output=path, precision="bf16", resolutions=((144, 112),), text_tokens=13))
    return Engine.load(path)


def test_graphed_loop_equals_eager_loop_on_gpu(tiny_bf16_cuda):
    """The CUDA-graphed step replays exactly what the eager step computes."""
    emb = random_embeddings(dtype=torch.bfloat16)
    graphed = tiny_bf16_cuda.denoise(*emb, height=144, width=112, steps=6, seed=3)
    eager = tiny_bf16_cuda.denoise(*emb, height=144, width=112, steps=6, seed=3, cuda_graph=False)
    assert torch.equal(graphed, eager)
    again = tiny_bf16_cuda.denoise(*emb, height=144, width=112, steps=6, seed=3)  # graph reuse
    assert torch.equal(graphed, again)


def test_bf16_engine_matches_diffusers_pipeline_on_gpu(tiny_bf16_cuda):
    from fluxc.models import load_model
    from fluxc.numerics import assert_close_report

    model = load_model("tiny", dtype=torch.bfloat16, device=torch.device("cuda"), seed=0).module
    pipe = flux_pipeline(model)
    pe, pooled = (t.cuda() for t in random_embeddings(dtype=torch.bfloat16))
    ref = pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, height=144, width=112, num_inference_steps=8,
               guidance_scale=3.5, generator=torch.Generator().manual_seed(5), output_type="latent").images
    got = tiny_bf16_cuda.denoise(pe, pooled, height=144, width=112, steps=8, guidance=3.5, seed=5)
    assert_close_report(got.float(), ref.float(), name="bf16 latents after 8 steps", rtol=3e-2)
