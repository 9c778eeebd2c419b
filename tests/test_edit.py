"""Image to image (issue 30): an engine built with --tasks t2i,img2img against diffusers' FluxImg2ImgPipeline
loaded from the same folder, with the same image, prompts, strength and seed."""

import copy

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import TINY_PROFILES, TINY_TEXT, build_tiny_pipeline
from fluxc.cli import main
from fluxc.runtime.core.cache_config import CacheConfig
from fluxc.runtime.core.errors import FluxcError

STEPS = 4
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]


@pytest.fixture(scope="module")
def img2img_path(tiny_pipeline_dir, tmp_path_factory):
    return build_tiny_pipeline(tiny_pipeline_dir, str(tmp_path_factory.mktemp("engines") / "tiny-img2img.fluxe"),
                               tasks=("t2i", "img2img", "inpaint"))


@pytest.fixture(scope="module")
def engine(img2img_path):
    from fluxc.runtime import Engine

    return Engine.load(img2img_path)


@pytest.fixture(scope="module")
def reference(tiny_pipeline_dir):
    from diffusers import FluxImg2ImgPipeline

    return FluxImg2ImgPipeline.from_pretrained(tiny_pipeline_dir, torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def photo():
    """An RGB image of the profile's size (144x112: width 112) with structure (a gradient and a disc) and noise."""
    y, x = np.mgrid[:144, :112] / np.array([144, 112])[:, None, None]
    disc = ((y - 0.4) ** 2 + (x - 0.5) ** 2 < 0.05).astype(float)
    rgb = np.stack([x, y, disc], -1) * 0.8 + np.random.default_rng(0).random((144, 112, 3)) * 0.2
    return Image.fromarray((rgb * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def mask():
    """Repaint a rectangle and a soft-edged disc (grey levels on both sides of 0.5), keep the rest."""
    y, x = np.mgrid[:144, :112]
    m = np.zeros((144, 112))
    m[20:70, 10:60] = 1.0
    m = np.maximum(m, np.clip(1.5 - np.hypot(y - 100, x - 70) / 20, 0, 1))
    return Image.fromarray((m * 255).astype(np.uint8), mode="L")


def run_reference(pipe, prompts, image, strength, seed, steps=STEPS, guidance_scale=3.5, **kwargs):
    return pipe(prompts, image=image, strength=strength, height=144, width=112, num_inference_steps=steps,
                guidance_scale=guidance_scale, max_sequence_length=TINY_TEXT, generator=torch.Generator().manual_seed(seed),
                output_type="np", **kwargs).images


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_matches_flux_img2img_pipeline(engine, reference, photo, strength):
    """Two prompts, one image and one generator for both (the engine's batch is 1: two chunks)."""
    got = engine.generate(PROMPTS, image=photo, strength=strength, steps=STEPS, seed=3, output_type="np")
    want = run_reference(reference, PROMPTS, photo, strength, seed=3)
    assert got.shape == want.shape == (2, 144, 112, 3)
    assert np.abs(got - want).max() <= 1e-3
    t2i = engine.generate(PROMPTS, steps=STEPS, seed=3, output_type="np")
    assert np.abs(got - t2i).max() > 0.05  # the image really conditions the result


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_inpaint_matches_flux_inpaint_pipeline(engine, tiny_pipeline_dir, photo, mask, strength):
    """FluxInpaintPipeline with the same image, mask, prompts, strength and generator; outside the mask the image
    stays close to the source (the blend keeps it, up to the VAE's reconstruction)."""
    from diffusers import FluxInpaintPipeline

    pipe = FluxInpaintPipeline.from_pretrained(tiny_pipeline_dir, torch_dtype=torch.float32)
    got = engine.generate(PROMPTS, image=photo, mask=mask, strength=strength, steps=STEPS, seed=5, output_type="np")
    want = run_reference(pipe, PROMPTS, photo, strength, seed=5, mask_image=mask)
    assert np.abs(got - want).max() <= 1e-3
    plain = engine.generate(PROMPTS, image=photo, strength=strength, steps=STEPS, seed=5, output_type="np")
    assert np.abs(got - plain).max() > 0.05  # the mask really changes the result


def test_img2img_fbcache_decides_as_diffusers_first_block_cache(engine, reference, photo):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    patterns = []
    for threshold in (0.3, 0.6, 0.95, 2.0):
        pipe = copy.copy(reference)
        pipe.transformer = copy.deepcopy(reference.transformer)
        apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=threshold))
        calls, computed = [], []
        pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(len(calls)))
        pipe.transformer.single_transformer_blocks[-1].attn.register_forward_hook(
            lambda *_: computed.append(calls[-1]))
        with pipe.transformer.cache_context("cond"):  # FluxPipeline sets it per step; FluxImg2ImgPipeline doesn't
            want = run_reference(pipe, PROMPTS[:1], photo, 0.75, seed=4, steps=8)
        report = {}
        got = engine.generate(PROMPTS[0], image=photo, strength=0.75, steps=8, seed=4, output_type="np",
                              cache_config=CacheConfig("fbcache", threshold), report=report)
        skipped = report["cache"]["skipped_steps"]
        assert len(calls) == 6  # int(8 * 0.75) of the 8 steps run
        assert skipped == [i for i in range(len(calls)) if i not in computed], threshold
        assert np.abs(got - want).max() <= 1e-3, threshold
        patterns.append(len(skipped))
    print("img2img FBCache skips per threshold:", patterns)
    assert patterns[0] < patterns[-1]


def test_cli_run_image_to_image(img2img_path, engine, photo, tmp_path):
    photo.save(tmp_path / "in.png")
    out = str(tmp_path / "out.png")
    result = CliRunner().invoke(main, ["run", img2img_path, "--prompt", PROMPTS[0], "--image", str(tmp_path / "in.png"),
                                       "--strength", "0.6", "--steps", str(STEPS), "--seed", "2", "-o", out])
    assert result.exit_code == 0, result.output
    want = engine.generate(PROMPTS[0], image=photo, strength=0.6, steps=STEPS, seed=2)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))


def test_bad_image_input_is_a_clear_error(engine, tiny_pipeline_engine, photo, mask):
    cases = [
        (tiny_pipeline_engine, dict(image=photo), "built without an image task"),
        (engine, dict(image=photo, mask=mask.resize((96, 128))), "The mask is 96x128"),
        (engine, dict(mask=mask), "A mask was given without an image"),
        (engine, dict(image=photo.resize((96, 128))), "The image is 96x128"),
        (engine, dict(image=photo.convert("RGBA")), "The image is RGBA"),
        (engine, dict(image=np.asarray(photo)), "must be a PIL image"),
        (engine, dict(image=photo, strength=0), "strength must be in (0, 1]"),
        (engine, dict(image=photo, strength=1.5), "strength must be in (0, 1]"),
        (engine, dict(image=[photo, photo]), "2 images were given for 1 prompts"),
    ]
    for eng, kwargs, words in cases:
        with pytest.raises(FluxcError, match=None) as e:
            eng.generate(PROMPTS[0], steps=STEPS, **kwargs)
        assert words in e.value.message and e.value.remedy, (words, e.value.message)


def test_openai_client_images_edit_gets_the_runtime_image(img2img_path, engine, photo, mask, tmp_path):
    """POST /v1/images/edits through the official client's images.edit (multipart: the PNG file, the prompt, the
    size, fluxc's fields as extra_body): the image Engine.generate makes; with an OpenAI mask (transparent: edit),
    the inpainted one; a strength out of range is a 400."""
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from test_serve import fluxc_serve, png

    photo.save(tmp_path / "in.png")
    server = fluxc_serve(img2img_path)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
        with open(tmp_path / "in.png", "rb") as f:
            result = client.images.edit(image=f, prompt=PROMPTS[0], n=2, size="112x144", response_format="b64_json",
                                        extra_body={"strength": 0.6, "steps": 3, "seed": 7})
        for datum, seed in zip(result.data, (7, 8)):
            want = engine.generate(PROMPTS[0], image=photo, strength=0.6, steps=3, seed=seed)[0]
            assert np.array_equal(png(datum.b64_json), np.asarray(want)), seed
        alpha = Image.new("RGBA", photo.size)  # OpenAI's mask: transparent where the image is to be edited
        alpha.putalpha(Image.eval(mask, lambda v: 255 - v))
        alpha.save(tmp_path / "mask.png")
        with open(tmp_path / "in.png", "rb") as f, open(tmp_path / "mask.png", "rb") as m:
            result = client.images.edit(image=f, mask=m, prompt=PROMPTS[0], size="112x144",
                                        extra_body={"strength": 0.6, "steps": 3, "seed": 7})
        want = engine.generate(PROMPTS[0], image=photo, mask=mask, strength=0.6, steps=3, seed=7)[0]
        assert np.array_equal(png(result.data[0].b64_json), np.asarray(want))
        with open(tmp_path / "in.png", "rb") as f:
            with pytest.raises(openai.BadRequestError, match="strength must be in"):
                client.images.edit(image=f, prompt=PROMPTS[0], extra_body={"strength": 2})
    finally:
        assert server.stop() == 0


# ---- FLUX.1 Fill ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fill(tmp_path_factory):
    """tiny-fill (the tiny model with FLUX.1 Fill's 384-channel image stream) as a diffusers folder and its engine."""
    from fluxc.frontend.components import load_components, save_pipeline_folder
    from fluxc.frontend.models import load_model
    from fluxc.runtime import Engine

    root = tmp_path_factory.mktemp("fill")
    model = load_model("tiny-fill", dtype=torch.float32, device=torch.device("cpu"), seed=0)
    save_pipeline_folder(str(root / "pipe"), model.module, load_components(
        "tiny-fill", "flux1", dtype=torch.float32, device=torch.device("cpu"), seed=0))
    return str(root / "pipe"), Engine.load(build_tiny_pipeline(str(root / "pipe"), str(root / "fill.fluxe"),
                                                               tasks=("fill",)))


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_fill_matches_flux_fill_pipeline(fill, photo, mask, strength):
    """FluxFillPipeline from the same folder: masked image latents and the 8x8-per-latent mask beside the latents
    every step, the masked image sampled from the generator after the noise."""
    from diffusers import FluxFillPipeline

    folder, engine = fill
    pipe = FluxFillPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    got = engine.generate(PROMPTS, image=photo, mask=mask, strength=strength, steps=STEPS, guidance=30.0, seed=3,
                          output_type="np")
    want = run_reference(pipe, PROMPTS, photo, strength, seed=3, mask_image=mask, guidance_scale=30.0)
    assert np.abs(got - want).max() <= 1e-3
    with pytest.raises(FluxcError, match="This is a FLUX.1 Fill engine"):
        engine.generate(PROMPTS[0], image=photo, steps=STEPS)


def test_fill_and_other_models_need_their_tasks(fill, tiny_pipeline_dir, tmp_path):
    from fluxc.build import BuildOptions, build

    for model, tasks, words, more in ((fill[0], ("t2i",), "is a FLUX.1 Fill model", {}),
                                      (tiny_pipeline_dir, ("fill",), "not a FLUX.1 Fill model", {}),
                                      (fill[0], ("fill",), "--calibrate with --tasks fill",
                                       dict(precision="fp8", calibrate=2))):
        with pytest.raises(FluxcError, match=words):
            build(BuildOptions(model=model, output=str(tmp_path / "x.fluxe"), target="cpu", resolutions=TINY_PROFILES[:1],
                               text_tokens=TINY_TEXT, tasks=tasks, **({"precision": "fp32"} | more)))
        assert not (tmp_path / "x.fluxe").exists()


# ---- FLUX.1 Kontext -------------------------------------------------------------------------------------------------
def kontext_reference(folder: str, photo, dtype: torch.dtype) -> np.ndarray:
    """FluxKontextPipeline editing `photo` for PROMPTS, the reference at the output size (no auto resize, max_area
    the profile's), seed 3."""
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(folder, torch_dtype=dtype)
    return pipe(image=photo, prompt=PROMPTS, height=144, width=112, num_inference_steps=STEPS, guidance_scale=2.5,
                max_sequence_length=TINY_TEXT, generator=torch.Generator().manual_seed(3), output_type="np",
                _auto_resize=False, max_area=144 * 112).images


@pytest.fixture(scope="module")
def kontext_want(tiny_pipeline_dir, photo):
    return kontext_reference(tiny_pipeline_dir, photo, torch.float32)


def kontext_engine(folder: str, path: str, precision: str = "fp32"):
    from fluxc.runtime import Engine

    return Engine.load(build_tiny_pipeline(folder, path, precision, tasks=("kontext",)))


def test_kontext_matches_flux_kontext_pipeline(tiny_pipeline_dir, photo, kontext_want, tmp_path):
    """--tasks kontext (any FLUX.1 folder has Kontext's architecture): the reference's tokens after the latents' in
    every profile's image stream, against FluxKontextPipeline; with FBCache on, the same images as without at
    threshold 0."""
    engine, want = kontext_engine(tiny_pipeline_dir, str(tmp_path / "kontext.fluxe")), kontext_want
    got = engine.generate(PROMPTS, image=photo, steps=STEPS, guidance=2.5, seed=3, output_type="np")
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-3
    cached = engine.generate(PROMPTS, image=photo, steps=STEPS, guidance=2.5, seed=3, output_type="np",
                             cache_config=CacheConfig("fbcache", 0.0))
    assert np.array_equal(cached, got)
    with pytest.raises(FluxcError, match="edits with 1 reference image"):
        engine.generate(PROMPTS[0], steps=STEPS)


@pytest.fixture(scope="module")
def kontext_want_bf16(tiny_pipeline_dir, photo):
    return kontext_reference(tiny_pipeline_dir, photo, torch.bfloat16)


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_quantized_kontext_engine_keeps_its_floor(tiny_pipeline_dir, photo, kontext_want_bf16, tmp_path, precision):
    """FP8 and NVFP4 (emulated on the CPU) on an edit engine: the transformer's block linears quantized as for text
    to image, the VAE encoder left in bf16 like the decoder (its attention's linears once went to FP8, and Inductor
    failed to lower the column-major activation); the edited images against FluxKontextPipeline in bf16 (the
    precisions' reference) keep the precision's segment floor, as [-1, 1] pixels. Measured when written: fp8
    28.9 dB, nvfp4 19.4 dB (the bf16 engine 34.7; diffusers bf16 against fp32 is 10.9 dB on the tiny model's
    random weights, so fp32 is no reference for a bf16-activation engine)."""
    from fluxc.numerics import FP8_SEGMENT_SQNR_DB, NVFP4_SEGMENT_SQNR_DB, sqnr_db

    engine = kontext_engine(tiny_pipeline_dir, str(tmp_path / f"kontext-{precision}.fluxe"), precision)
    quantized = {kind: [s["dtype"] for seg in engine.manifest["segments"] if seg["kind"] == kind
                        for s in seg["weight_specs"]] for kind in ("vae_encoder", "double")}
    assert set(quantized["vae_encoder"]) == {"bfloat16"} and set(quantized["double"]) - {"bfloat16"}
    got = engine.generate(PROMPTS, image=photo, steps=STEPS, guidance=2.5, seed=3, output_type="np")
    sqnr = sqnr_db(torch.from_numpy(got * 2 - 1), torch.from_numpy(kontext_want_bf16 * 2 - 1))
    print(f"tiny Kontext {precision} engine, edited images against FluxKontextPipeline bf16: {sqnr:.1f} dB")
    assert sqnr >= {"fp8": FP8_SEGMENT_SQNR_DB, "nvfp4": NVFP4_SEGMENT_SQNR_DB}[precision]
