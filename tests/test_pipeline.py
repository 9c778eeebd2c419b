"""Text to image: the whole-pipeline engine against diffusers' FluxPipeline loaded from the same folder."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import TINY_TEXT
from fluxc.cli import main

PROMPTS = ["a photo of a cat sitting on a red chair",
           "an astronaut riding a horse on the moon, digital art, with a description far longer than T5 keeps"]
SAMPLING = dict(height=144, width=112, steps=4, guidance=3.5)


@pytest.fixture(scope="module")
def reference(tiny_pipeline_dir):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_pipeline_dir, torch_dtype=torch.float32)


def run_reference(pipe, prompts, seed, output_type="np"):
    return pipe(prompts, height=144, width=112, num_inference_steps=4, guidance_scale=3.5,
                max_sequence_length=TINY_TEXT, generator=torch.Generator("cpu").manual_seed(seed),
                output_type=output_type).images


def test_images_match_flux_pipeline(tiny_pipeline_engine, reference):
    """Two prompts in one call (the engine's batch is 1, so they run as two chunks), one truncated."""
    with pytest.warns(UserWarning, match="truncated to 13 T5 tokens"):
        got = tiny_pipeline_engine.generate(PROMPTS, seed=3, output_type="np", **SAMPLING)
    ref = run_reference(reference, PROMPTS, seed=3)
    assert got.shape == ref.shape == (2, 144, 112, 3)
    assert np.abs(got - ref).max() <= 1e-3
    assert ref.std() > 0.05  # a real image, not a constant


def test_prompt_embeddings_match_encode_prompt(tiny_pipeline_engine, reference):
    with pytest.warns(UserWarning):
        embeds, pooled = tiny_pipeline_engine.encode_prompt(PROMPTS)
    ref_embeds, ref_pooled, _ = reference.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=TINY_TEXT)
    assert embeds.shape == ref_embeds.shape == (2, TINY_TEXT, 64) and pooled.shape == ref_pooled.shape == (2, 32)
    torch.testing.assert_close(embeds, ref_embeds, rtol=0, atol=1e-4)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=1e-4)


def test_pil_images_round_as_diffusers(tiny_pipeline_engine, reference):
    got = tiny_pipeline_engine.generate(PROMPTS[0], seed=1, **SAMPLING)
    ref = run_reference(reference, [PROMPTS[0]], seed=1, output_type="pil")
    assert got[0].size == ref[0].size == (112, 144)
    assert np.abs(np.asarray(got[0], dtype=int) - np.asarray(ref[0], dtype=int)).max() <= 1


def test_seed_and_generator_agree_and_repeat(tiny_pipeline_engine):
    a = tiny_pipeline_engine.generate("a bowl of fruit", seed=11, output_type="pt", **SAMPLING)
    b = tiny_pipeline_engine.generate("a bowl of fruit", generator=torch.Generator().manual_seed(11),
                                      output_type="pt", **SAMPLING)
    c = tiny_pipeline_engine.generate("a bowl of fruit", seed=12, output_type="pt", **SAMPLING)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_chunks_pad_to_the_static_batch():
    from fluxc.runtime.loop import chunked as _chunked

    x = torch.arange(10.0, dtype=torch.float64).view(5, 2)
    seen = []

    def fn(chunk):
        seen.append(chunk.shape[0])
        return [chunk * 2, chunk.sum(1)]

    doubled, sums = _chunked(fn, 2, x)
    assert seen == [2, 2, 2]
    assert torch.equal(doubled, x * 2) and torch.equal(sums, x.sum(1))


def test_cli_writes_the_png_generate_makes(tiny_pipeline_engine_path, tiny_pipeline_engine, tmp_path):
    out = str(tmp_path / "cat.png")
    result = CliRunner().invoke(main, ["run", tiny_pipeline_engine_path, "--prompt", PROMPTS[0], "--steps", "4",
                                       "--seed", "2", "-o", out])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].startswith("PASSED |")
    expected = tiny_pipeline_engine.generate(PROMPTS[0], seed=2, **SAMPLING)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    assert os.listdir(tmp_path) == ["cat.png"]  # nothing partial left behind


def test_cli_prompts_file_writes_one_image_each(tiny_pipeline_engine_path, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\nthe moon at night\n")
    result = CliRunner().invoke(main, ["run", tiny_pipeline_engine_path, "--prompts", str(prompts), "--steps", "2",
                                       "-o", str(tmp_path / "img.png")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("img-*.png")) == ["img-000.png", "img-001.png"]


MINIMAL = """
import importlib.abc, sys
class Forbid(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("diffusers", "transformers") or name.startswith(("fluxc.passes", "fluxc.build", "fluxc.frontend.trace")):
            raise ImportError(f"minimal runtime imported {name}")
sys.meta_path.insert(0, Forbid())
import numpy as np
from fluxc.runtime import Engine
image = Engine.load(sys.argv[1]).generate(sys.argv[2], seed=2, height=144, width=112, steps=4, output_type="np")
np.save(sys.argv[3], image)
"""


def test_minimal_runtime_makes_the_image_without_compiler_imports(tiny_pipeline_engine_path, tiny_pipeline_engine,
                                                                  tmp_path):
    out = str(tmp_path / "image.npy")
    proc = subprocess.run([sys.executable, "-c", MINIMAL, tiny_pipeline_engine_path, PROMPTS[0], out],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = tiny_pipeline_engine.generate(PROMPTS[0], seed=2, output_type="np", **SAMPLING)
    assert np.array_equal(np.load(out), expected)


def test_the_forbidding_hook_really_forbids():
    """The subprocess hook above must be able to fail: importing diffusers under it raises."""
    code = MINIMAL.split("import numpy")[0] + "import diffusers\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "minimal runtime imported diffusers" in proc.stderr
