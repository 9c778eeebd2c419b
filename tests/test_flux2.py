"""FLUX.2 (issue 11): the second model family through the same tracer, passes and runtime, on `tiny-flux2`
(seeded random weights of diffusers' Flux2Transformer2DModel architecture)."""

import json
import os

import pytest
import torch

TEXT = 16
SIZE = (128, 112)


@pytest.fixture(scope="module")
def flux2_engine(tmp_path_factory):
    from fluxc.build import BuildOptions, build

    path = str(tmp_path_factory.mktemp("engines") / "tiny-flux2.fluxe")
    build(BuildOptions(model="tiny-flux2", output=path, target="cpu", precision="fp32", resolutions=(SIZE,),
                       text_tokens=TEXT, transformer_only=True))
    return path


def transformer_inputs(engine, model) -> tuple[dict, dict]:
    """Seeded inputs of one transformer forward at SIZE, and the position ids Flux2Pipeline gives them."""
    cfg, profile = model.config, engine.profile_for(*SIZE)
    g = torch.Generator().manual_seed(0)
    x = dict(hidden_states=torch.randn(1, profile.image_tokens, cfg.in_channels, generator=g),
             encoder_hidden_states=torch.randn(1, TEXT, cfg.joint_attention_dim, generator=g),
             timestep=torch.tensor([0.7]), guidance=torch.tensor([4.0]))
    h, w = SIZE[0] // 16, SIZE[1] // 16
    # Flux2Pipeline._prepare_text_ids / _prepare_latent_ids: (t, h, w, l) = (0, 0, 0, i) and (0, row, col, 0)
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(TEXT))
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    return x, {"img_ids": img_ids, "txt_ids": txt_ids}


def test_transformer_equals_diffusers_flux2_eager(flux2_engine):
    """One forward of the engine's segments (head with the shared modulations hoisted into the schedule, double
    and single blocks, tail) against Flux2Transformer2DModel itself, with the Flux2Pipeline's position ids."""
    from fluxc.frontend.models import load_model
    from fluxc.runtime import Engine

    engine = Engine.load(flux2_engine)
    model = load_model("tiny-flux2", dtype=torch.float32, device=torch.device("cpu"), seed=0).module
    profile = engine.profile_for(*SIZE)
    x, ids = transformer_inputs(engine, model)
    cos, sin = engine.rope(profile)
    got = engine.transformer(profile, dict(x, rope_cos=cos, rope_sin=sin))
    with torch.no_grad():
        want = model(**x, **ids, return_dict=False)[0]
    assert got.shape == want.shape and want.abs().max() > 1.0
    assert (got - want).abs().max() <= 1e-4


def test_flux2_passes_fuse_what_the_blocks_share_with_flux1(flux2_engine):
    """The same passes run on FLUX.2's graphs: QKV, q/k norm + RoPE and AdaLN (FLUX.2's `(1 + scale) * ln + shift`
    on [B, 1, C] slices of the shared modulation) fuse; the head's timestep embedding and shared modulations are
    hoisted into the per-step schedule; the first double block gets its TeaCache probe."""
    from fluxc.runtime.core.bundle import read_manifest

    m = read_manifest(flux2_engine)
    double, single = m["pass_counts"]["double-128x112"], m["pass_counts"]["single-128x112"]
    assert m["model"]["family"] == "flux2"
    assert double["fuse_qkv"]["groups"] == 2 and double["fuse_qk_norm_rope"]["fused"] == single["fuse_qk_norm_rope"]["fused"] == 1
    assert double["fuse_adaln"]["fused"] == 2 and single["fuse_adaln"]["fused"] == 1
    assert m["pass_counts"]["head-128x112"]["hoist_schedule"]["values"] == 4  # temb and the three modulations
    assert m["cache"]["probes"]["modulated"] == "double_probe"
    assert all(v["max_relative_error"] <= 1e-4 for v in m["numerics"].values())


@pytest.mark.parametrize("precision, floor, calibrate", [("fp8", "FP8_SEGMENT_SQNR_DB", 0),
                                                         ("nvfp4", "NVFP4_SEGMENT_SQNR_DB", 0),
                                                         ("fp8", "FP8_SEGMENT_SQNR_DB", 2)])
def test_quantized_flux2_engines_denoise_close_to_bf16(tmp_path, precision, floor, calibrate):
    """fp8 and (emulated) nvfp4 FLUX.2 engines, and fp8 with static scales from 2 calibration loops of the eager
    FLUX.2 model (FLUX.2's noise, schedule and block inputs): 8-step latents against the bf16 engine's at the
    precision's segment floor (measured: fp8 36.7 dB, nvfp4 26.3 dB)."""
    from fluxc import numerics
    from fluxc.build import BuildOptions, build
    from fluxc.runtime import Engine

    paths = {}
    for p in ("bf16", precision):
        paths[p] = str(tmp_path / f"{p}.fluxe")
        build(BuildOptions(model="tiny-flux2", output=paths[p], target="cpu", precision=p, resolutions=(SIZE,),
                           text_tokens=TEXT, transformer_only=True, calibrate=calibrate if p == precision else 0))
    if calibrate:
        m = json.load(open(os.path.join(paths[precision], "manifest.json")))
        assert m["calibration"]["samples"] == calibrate
        for kind in ("double", "single"):
            counts = m["pass_counts"][f"{kind}-128x112"]["quantize_fp8"]
            assert counts["static_inputs"] == counts["inputs"] > 0
    dim = Engine.load(paths["bf16"]).config["joint_attention_dim"]
    embeds = torch.randn(1, TEXT, dim, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    got, want = (Engine.load(paths[p]).denoise(embeds, None, height=SIZE[0], width=SIZE[1], steps=8, seed=3)
                 for p in (precision, "bf16"))
    assert numerics.sqnr_db(got.float(), want.float()) >= getattr(numerics, floor)


def test_flux2_fp8_epilogues_fuse_the_gated_residuals(tmp_path):
    """Recipe sm90_fp8_epilogues on FLUX.2: its gates are [B, 1, N] slices of the shared modulation (FLUX.1's are
    unsqueezed [B, N]), and every output projection's gated residual goes into the FP8 GEMM (a double block's 4, a
    single block's 1), the other GEMMs run on the same kernel (a double block's QKV and MLP input projections, image
    and text; a single block's fused QKV + MLP input projection); its SwiGLU MLP has no GELU to fuse. The 8-step
    latents against the bf16 engine's stay within 0.5 dB of the unfused fp8 engine's."""
    from fluxc import numerics
    from fluxc.build import BuildOptions, build
    from fluxc.runtime import Engine

    paths = {}
    for recipe in ("bf16", "sm90_fp8", "sm90_fp8_epilogues"):
        paths[recipe] = str(tmp_path / f"{recipe}.fluxe")
        manifest = build(BuildOptions(model="tiny-flux2", output=paths[recipe], target="cpu", recipe=recipe,
                                      resolutions=(SIZE,), text_tokens=TEXT, transformer_only=True))
    counts = manifest["pass_counts"]
    assert counts["double-128x112"]["fuse_fp8_epilogues"] == {"gate_residual": 4, "gelu": 0, "plain": 4}
    assert counts["single-128x112"]["fuse_fp8_epilogues"] == {"gate_residual": 1, "gelu": 0, "plain": 1}
    assert counts["double-128x112"]["fuse_adaln"]["fused"] == 4  # the norm2s too: their input is the GEMM's sum
    dim = Engine.load(paths["bf16"]).config["joint_attention_dim"]
    embeds = torch.randn(1, TEXT, dim, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    latents = {r: Engine.load(p).denoise(embeds, None, height=SIZE[0], width=SIZE[1], steps=8, seed=3).float()
               for r, p in paths.items()}
    fused, unfused = (numerics.sqnr_db(latents[r], latents["bf16"]) for r in ("sm90_fp8_epilogues", "sm90_fp8"))
    print(f"tiny-flux2 fp8 with GEMM epilogues, 8-step latents against bf16: {fused:.1f} dB (unfused {unfused:.1f})")
    assert fused >= numerics.FP8_SEGMENT_SQNR_DB and fused >= unfused - 0.5


def test_flux2_fp8_attention_engine_denoises_close_to_bf16(tmp_path):
    """Recipe sm90_fp8_attn_epilogues on FLUX.2: each block's attention on e4m3 q, k, v (fluxc.attention_fp8, the
    reference implementation on the CPU) and its output read by the output projections' FP8 GEMMs in e4m3; the
    8-step latents against the bf16 engine's at the FP8-attention segment floor."""
    from fluxc import numerics
    from fluxc.build import BuildOptions, build
    from fluxc.runtime import Engine

    paths = {}
    for recipe in ("bf16", "sm90_fp8_attn_epilogues"):
        paths[recipe] = str(tmp_path / f"{recipe}.fluxe")
        manifest = build(BuildOptions(model="tiny-flux2", output=paths[recipe], target="cpu", recipe=recipe,
                                      resolutions=(SIZE,), text_tokens=TEXT, transformer_only=True))
    for kind in ("double", "single"):
        assert manifest["pass_counts"][f"{kind}-128x112"]["quantize_fp8_attention"] == {"attention": 1}, kind
    dim = Engine.load(paths["bf16"]).config["joint_attention_dim"]
    embeds = torch.randn(1, TEXT, dim, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    got, want = (Engine.load(paths[r]).denoise(embeds, None, height=SIZE[0], width=SIZE[1], steps=8, seed=3).float()
                 for r in ("sm90_fp8_attn_epilogues", "bf16"))
    sqnr = numerics.sqnr_db(got, want)
    print(f"tiny-flux2 fp8 attention + GEMM epilogues, 8-step latents against bf16: {sqnr:.1f} dB")
    assert sqnr >= numerics.FP8_ATTENTION_SEGMENT_SQNR_DB


def test_denoising_loop_equals_flux2_pipeline(flux2_engine):
    """8 steps from prompt embeddings: the engine's loop (FLUX.2's noise layout, its empirical schedule shift,
    guidance 4) against diffusers' Flux2Pipeline with the same transformer, output_type="latent". The scheduler
    is FlowMatchEulerDiscreteScheduler with dynamic (exponential) shifting, as FLUX.1-dev's config has it; no
    FLUX.2 checkpoint config can be downloaded here to confirm FLUX.2-dev's."""
    from diffusers import Flux2Pipeline

    from fluxc.frontend.components import flux2_scheduler
    from fluxc.frontend.models import load_model
    from fluxc.runtime import Engine

    model = load_model("tiny-flux2", dtype=torch.float32, device=torch.device("cpu"), seed=0).module
    embeds = torch.randn(1, TEXT, model.config.joint_attention_dim, generator=torch.Generator().manual_seed(1))
    got = Engine.load(flux2_engine).denoise(embeds, None, height=SIZE[0], width=SIZE[1], steps=8, guidance=4.0, seed=3)
    pipe = Flux2Pipeline(scheduler=flux2_scheduler(), vae=None, text_encoder=None, tokenizer=None, transformer=model)
    want = pipe(prompt_embeds=embeds, height=SIZE[0], width=SIZE[1], num_inference_steps=8, guidance_scale=4.0,
                generator=torch.Generator("cpu").manual_seed(3), output_type="latent").images
    assert got.shape == want.shape and want.std() > 0.1
    assert (got - want).abs().max() <= 1e-3


def test_fluxc_run_writes_flux2_latents_from_prompt_embeddings_alone(flux2_engine, tmp_path):
    """A FLUX.2 embeddings file holds prompt_embeds only (no pooled text); the output equals Engine.denoise."""
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from fluxc.cli import main
    from fluxc.runtime import Engine

    engine = Engine.load(flux2_engine)
    embeds = torch.randn(1, TEXT, engine.config["joint_attention_dim"], generator=torch.Generator().manual_seed(2))
    save_file({"prompt_embeds": embeds}, str(tmp_path / "e.safetensors"))
    out = tmp_path / "latents.safetensors"
    result = CliRunner().invoke(main, ["run", flux2_engine, "--embeddings", str(tmp_path / "e.safetensors"), "--steps", "3",
                                       "--seed", "4", "-o", str(out)])
    assert result.exit_code == 0, result.output
    got = load_file(str(out))
    want = engine.denoise(embeds, None, height=SIZE[0], width=SIZE[1], steps=3, seed=4)
    assert torch.equal(got["packed_latents"], want) and got["latents"].shape == (1, 128, SIZE[0] // 16, SIZE[1] // 16)


# ---- whole-pipeline FLUX.2 engines: the Mistral text encoder, the VAE, `fluxc run` ---------------------------
PIPE_TEXT = 48  # the chat-formatted prompt: the tiny tokenizer spends about 30 tokens on the system message


@pytest.fixture(scope="module")
def flux2_pipeline(tmp_path_factory):
    """tiny-flux2 with its components saved as a diffusers FLUX.2 folder, and the fp32 engine built from it."""
    from fluxc.build import BuildOptions, build
    from fluxc.frontend.components import load_components, save_pipeline_folder
    from fluxc.frontend.models import load_model

    root = tmp_path_factory.mktemp("flux2-pipeline")
    cpu = torch.device("cpu")
    comps = load_components("tiny-flux2", "flux2", dtype=torch.float32, device=cpu, seed=0)
    save_pipeline_folder(str(root / "dir"), load_model("tiny-flux2", dtype=torch.float32, device=cpu, seed=0).module,
                         comps)
    engine = str(root / "pipeline.fluxe")
    build(BuildOptions(model=str(root / "dir"), output=engine, target="cpu", precision="fp32", resolutions=(SIZE,),
                       text_tokens=PIPE_TEXT))
    return str(root / "dir"), engine


def test_flux2_pipeline_engine_image_equals_flux2_pipeline(flux2_pipeline):
    """Prompt to image: the engine's Mistral segment (chat template rendered by the runtime, left padding and
    its mask), loop and VAE (batch-norm statistics, unpatchify) against Flux2Pipeline loaded from the same folder
    by diffusers, same prompt and seed."""
    from diffusers import Flux2Pipeline

    from fluxc.runtime import Engine

    folder, path = flux2_pipeline
    pipe = Flux2Pipeline.from_pretrained(folder, torch_dtype=torch.float32)
    engine = Engine.load(path)
    prompts = ["a red fox", "a red fox in fresh snow [IMG], telephoto"]  # padded (left); cut (with a warning)
    kw = dict(max_sequence_length=PIPE_TEXT, text_encoder_out_layers=(1, 2, 3))
    want_embeds, _ = pipe.encode_prompt(prompts, **kw)
    with pytest.warns(UserWarning, match="truncated to 48 MISTRAL tokens"):
        embeds, pooled = engine.encode_prompt(prompts)
    assert pooled is None and (embeds - want_embeds).abs().max() <= 1e-4
    want = pipe(prompt=prompts, height=SIZE[0], width=SIZE[1], num_inference_steps=4, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(3), output_type="np", **kw).images
    with pytest.warns(UserWarning, match="truncated"):
        got = engine.generate(prompts, height=SIZE[0], width=SIZE[1], steps=4, guidance=4.0, seed=3, output_type="np")
    assert got.shape == want.shape and want.std() > 0.05
    assert abs(got - want).max() <= 1e-3


def test_fluxc_run_writes_a_flux2_png(flux2_pipeline, tmp_path):
    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from fluxc.cli import main
    from fluxc.runtime import Engine

    _, path = flux2_pipeline
    out = tmp_path / "fox.png"
    result = CliRunner().invoke(main, ["run", path, "--prompt", "a red fox in fresh snow", "--steps", "3", "--seed", "1",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    want = Engine.load(path).generate("a red fox in fresh snow", steps=3, seed=1, guidance=3.5)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))


def test_flux2_reference_images_equal_flux2_pipeline(flux2_pipeline, tmp_path):
    """--tasks references --references 2: two reference images (profile size) after the latents in the image stream,
    each with its own time coordinate (10, 20), against Flux2Pipeline(image=[a, b]) from the same folder."""
    import numpy as np
    from diffusers import Flux2Pipeline
    from PIL import Image

    from fluxc.build import BuildOptions, build
    from fluxc.runtime import Engine
    from fluxc.runtime.core.errors import FluxcError

    folder, _ = flux2_pipeline
    path = str(tmp_path / "refs.fluxe")
    build(BuildOptions(model=folder, output=path, target="cpu", precision="fp32", resolutions=(SIZE,),
                       text_tokens=PIPE_TEXT, tasks=("references",), references=2))
    y, x = np.mgrid[:SIZE[0], :SIZE[1]] / np.array(SIZE)[:, None, None]
    a = Image.fromarray((np.stack([x, y, x * y], -1) * 255).astype(np.uint8))
    b = Image.fromarray((np.stack([1 - y, x, 0.5 + 0 * x], -1) * 255).astype(np.uint8))
    pipe = Flux2Pipeline.from_pretrained(folder, torch_dtype=torch.float32)
    prompts = ["put the fox in the second picture", "a lighthouse"]
    want = pipe(image=[a, b], prompt=prompts, height=SIZE[0], width=SIZE[1], num_inference_steps=4, guidance_scale=4.0,
                max_sequence_length=PIPE_TEXT, text_encoder_out_layers=(1, 2, 3),
                generator=torch.Generator().manual_seed(3), output_type="np").images
    engine = Engine.load(path)
    got = engine.generate(prompts, image=[a, b], steps=4, guidance=4.0, seed=3, output_type="np")
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-3
    one = engine.generate(prompts, image=[a, a], steps=4, guidance=4.0, seed=3, output_type="np")
    assert np.abs(one - got).max() > 5e-3  # the second reference really conditions the result (0.023 measured)
    with pytest.raises(FluxcError, match="edits with 2 reference image"):
        engine.generate(prompts[0], image=a, steps=4)
