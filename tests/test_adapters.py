"""LoRA adapters (fluxc adapter, Engine.set_adapters): the engine with an adapter against diffusers' FluxPipeline
after load_lora_weights, from the same folder, prompt embeddings and noise.

The LoRAs are made by PEFT on the tiny transformer (every linear, rank 4, alpha 8: scale 2) and saved by diffusers'
save_lora_weights; the kohya and XLabs fixtures hold the same adapter in those key layouts, and each is checked by
its round trip through diffusers' converters before it is used.
"""

import os
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import TINY_TEXT
from fluxc.cli import main
from fluxc.numerics import (ADAPTER_SQNR_LOSS_DB, FP8_SEGMENT_SQNR_DB, NVFP4_SEGMENT_SQNR_DB, RELATIVE_ERROR_FLOORS,
                            assert_close_report, relative_error, sqnr_db)

SAMPLING = dict(height=144, width=112, steps=4, guidance=3.5)
PROMPT = "a watercolor fox in the snow"


def add_random_lora(transformer, seed: int, targets=None, rank: int = 4, alpha: int = 8):
    """A PEFT LoRA on the transformer's linears (`targets`: a regex their names match, default every one), its
    factors drawn small (a real adapter moves weights by a few percent); returns its LoraConfig."""
    from peft import LoraConfig

    linears = [n for n, m in transformer.named_modules()
               if isinstance(m, torch.nn.Linear) and re.fullmatch(targets or ".*", n)]
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=linears)
    transformer.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "lora_A" in name else 0.01))
    return config


def save_lora(pipeline_class, transformer, config, path: str) -> str:
    """The transformer's adapter saved by diffusers' save_lora_weights, with its PEFT metadata (alpha)."""
    from peft.utils import get_peft_model_state_dict

    os.makedirs(path, exist_ok=True)
    pipeline_class.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                     transformer_lora_adapter_metadata=config.to_dict())
    return os.path.join(path, "pytorch_lora_weights.safetensors")


def peft_lora(pipeline_dir: str, path: str, seed: int, targets=None) -> str:
    """A random PEFT LoRA on the tiny pipeline's transformer, as a diffusers LoRA file."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(pipeline_dir, subfolder="transformer")
    return save_lora(FluxPipeline, transformer, add_random_lora(transformer, seed, targets), path)


@pytest.fixture(scope="module")
def loras(tiny_pipeline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {name: peft_lora(tiny_pipeline_dir, str(root / name), seed) for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="module")
def adapters(loras, tiny_pipeline_engine_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, lora in loras.items():
        out[name] = str(root / f"{name}.fluxa")
        result = CliRunner().invoke(main, ["adapter", tiny_pipeline_engine_path, lora, "-o", out[name]])
        assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def reference(tiny_pipeline_dir):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_pipeline_dir, torch_dtype=torch.float32)


def inputs(pipe, seed: int = 4):
    """Prompt embeddings from diffusers' encode_prompt and packed noise: the denoising loop's inputs."""
    embeds, pooled, _ = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=TINY_TEXT)
    noise = torch.randn(1, (144 // 16) * (112 // 16), 64, generator=torch.Generator().manual_seed(seed))
    return embeds, pooled, noise


def reference_latents(pipe, embeds, pooled, noise, dtype=torch.float32):
    return pipe(prompt_embeds=embeds.to(dtype), pooled_prompt_embeds=pooled.to(dtype), latents=noise.to(dtype),
                num_inference_steps=SAMPLING["steps"], guidance_scale=SAMPLING["guidance"], height=144, width=112,
                output_type="latent").images.float()


def engine_latents(engine, embeds, pooled, noise):
    return engine.denoise(embeds, pooled, latents=noise, **SAMPLING).float()


@pytest.fixture
def with_loras(reference, loras):
    """The reference pipeline with adapters a and b loaded (and unloaded after the test)."""
    for name, path in loras.items():
        reference.load_lora_weights(path, adapter_name=name)
    yield reference
    reference.unload_lora_weights()


def test_one_and_two_adapters_match_flux_pipeline(tiny_pipeline_engine_path, adapters, with_loras):
    from fluxc.runtime import Engine

    engine = Engine.load(tiny_pipeline_engine_path)
    embeds, pooled, noise = inputs(with_loras)
    for chosen in ([("a", 1.0)], [("a", 0.7), ("b", 0.5)]):
        with_loras.set_adapters([n for n, _ in chosen], [s for _, s in chosen])
        want = reference_latents(with_loras, embeds, pooled, noise)
        engine.set_adapters([(adapters[n], s) for n, s in chosen])
        assert_close_report(engine_latents(engine, embeds, pooled, noise), want, rtol=1e-4, name=str(chosen))
    with_loras.disable_lora()
    base = reference_latents(with_loras, embeds, pooled, noise)
    assert relative_error(want, base) > 0.1  # the adapters really change the image (~30% here)


def test_removing_restores_the_base_and_switching_repeats(tiny_pipeline_engine_path, adapters):
    from fluxc.runtime import Engine

    engine = Engine.load(tiny_pipeline_engine_path)
    before = {k: [t.clone() for t in ts] for k, ts in engine._weights.items()}
    base = engine.generate(PROMPT, seed=1, output_type="pt", **SAMPLING)
    images = []
    for chosen in ([(adapters["a"], 0.8)], [(adapters["b"], 1.0)], [(adapters["a"], 0.8)]):
        report = engine.set_adapters(chosen)
        assert report["tensors"] > 0
        images.append(engine.generate(PROMPT, seed=1, output_type="pt", **SAMPLING))
    assert torch.equal(images[0], images[2]) and not torch.equal(images[0], images[1])
    assert engine.adapters == [("a", 0.8)]
    engine.set_adapters([])
    assert all(torch.equal(t, b) for k, ts in engine._weights.items() for t, b in zip(ts, before[k]))
    assert torch.equal(engine.generate(PROMPT, seed=1, output_type="pt", **SAMPLING), base)


# ---- the same adapter in kohya (sd-scripts) and XLabs key layouts ---------------------------------------------
KOHYA_DOUBLE = {"img_attn_proj": ["attn.to_out.0"], "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
                "img_mlp_0": ["ff.net.0.proj"], "img_mlp_2": ["ff.net.2"], "img_mod_lin": ["norm1.linear"],
                "txt_attn_proj": ["attn.to_add_out"],
                "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
                "txt_mlp_0": ["ff_context.net.0.proj"], "txt_mlp_2": ["ff_context.net.2"],
                "txt_mod_lin": ["norm1_context.linear"]}
KOHYA_SINGLE = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"],
                "modulation_lin": ["norm.linear"]}
XLABS_DOUBLE = {"processor.qkv_lora1": ["attn.to_q", "attn.to_k", "attn.to_v"], "processor.proj_lora1": ["attn.to_out.0"],
                "processor.qkv_lora2": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
                "processor.proj_lora2": ["attn.to_add_out"]}
XLABS_SINGLE = {"processor.qkv_lora": ["attn.to_q", "attn.to_k", "attn.to_v"], "processor.proj_lora": ["proj_out"]}
BLOCKS = r"(single_)?transformer_blocks\.\d+\..*"
ATTENTION = r"(single_)?transformer_blocks\.\d+\.(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|proj_out)"


def products(state_dict: dict, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """module -> scale * B @ A of a diffusers-layout LoRA state dict."""
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in state_dict}
    return {m: scale * state_dict[f"transformer.{m}.lora_B.weight"].double() @ state_dict[f"transformer.{m}.lora_A.weight"].double()
            for m in modules}


def fused(state_dict: dict, block: str, modules: list[str], scale: float):
    """One fused LoRA for `modules` of a block: A stacked, B block-diagonal, so that each module keeps its own delta."""
    downs = [state_dict[f"transformer.{block}.{m}.lora_A.weight"] for m in modules]
    ups = [state_dict[f"transformer.{block}.{m}.lora_B.weight"] for m in modules]
    return torch.cat(downs), torch.block_diag(*ups) * scale


def relayout(state_dict: dict, scale: float, double: dict, single: dict, key) -> dict:
    """The adapter in another key layout: key(kind, block index, name, "down" | "up") names each factor."""
    out = {}
    blocks = sorted({k.split(".")[1:3] and ".".join(k.split(".")[1:3]) for k in state_dict})
    for block in blocks:
        kind, index = block.split(".")
        for name, modules in (double if kind == "transformer_blocks" else single).items():
            if f"transformer.{block}.{modules[0]}.lora_A.weight" in state_dict:
                down, up = fused(state_dict, block, modules, scale)
                out[key(kind, index, name, "down")], out[key(kind, index, name, "up")] = down, up
    return out


def kohya(state_dict: dict, scale: float) -> dict:
    def key(kind, index, name, which):
        return f"lora_unet_{'double' if kind == 'transformer_blocks' else 'single'}_blocks_{index}_{name}.lora_{which}.weight"

    out = relayout(state_dict, 1.0, KOHYA_DOUBLE, KOHYA_SINGLE, key)
    for k in [k for k in out if k.endswith(".lora_down.weight")]:  # kohya's alpha: scale = alpha / rank
        out[k.replace(".lora_down.weight", ".alpha")] = torch.tensor(scale * out[k].shape[0])
    return out


def xlabs(state_dict: dict, scale: float) -> dict:  # XLabs has no alpha: the scale goes into up
    def key(kind, index, name, which):
        return f"{'double' if kind == 'transformer_blocks' else 'single'}_blocks.{index}.{name}.{which}.weight"

    return relayout(state_dict, scale, XLABS_DOUBLE, XLABS_SINGLE, key)


def assert_same_products(converted: dict, original: dict) -> None:
    assert converted.keys() == original.keys()
    for m in original:
        torch.testing.assert_close(converted[m], original[m], rtol=1e-6, atol=1e-9, msg=m)


@pytest.mark.parametrize("layout", ["kohya", "xlabs"])
def test_kohya_and_xlabs_layouts_match_flux_pipeline(layout, tiny_pipeline_dir, tiny_pipeline_engine_path, reference,
                                                     tmp_path):
    """The fixture round-trips through diffusers' converter to the PEFT adapter's deltas (kohya: all but the single
    blocks' linear1, which diffusers 0.42.1 splits at FLUX.1-dev's widths only); the engine with the converted
    adapter (fluxc adapter runs diffusers' kohya converter at the tiny widths) equals FluxPipeline with the PEFT file."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file, save_file

    from fluxc.runtime import Engine

    peft_file = peft_lora(tiny_pipeline_dir, str(tmp_path / "peft"), 3, targets=BLOCKS if layout == "kohya" else ATTENTION)
    original = load_file(peft_file)
    fixture = (kohya if layout == "kohya" else xlabs)(original, scale=2.0)
    checkable = {k: v for k, v in fixture.items() if "_linear1." not in k}
    converted = FluxPipeline.lora_state_dict(dict(checkable))
    assert_same_products(products(converted), {m: p for m, p in products(original, 2.0).items()
                                               if layout == "xlabs" or not m.startswith("single_transformer_blocks")
                                               or m.endswith(("proj_out", "norm.linear"))})
    save_file(fixture, str(tmp_path / f"{layout}.safetensors"))

    result = CliRunner().invoke(main, ["adapter", tiny_pipeline_engine_path, str(tmp_path / f"{layout}.safetensors"),
                                       "-o", str(tmp_path / f"{layout}.fluxa")])
    assert result.exit_code == 0, result.output
    reference.load_lora_weights(peft_file, adapter_name=layout)
    try:
        embeds, pooled, noise = inputs(reference)
        want = reference_latents(reference, embeds, pooled, noise)
    finally:
        reference.unload_lora_weights()
    engine = Engine.load(tiny_pipeline_engine_path)
    engine.set_adapters([(str(tmp_path / f"{layout}.fluxa"), 1.0)])
    assert_close_report(engine_latents(engine, embeds, pooled, noise), want, rtol=1e-4, name=layout)


@pytest.fixture(scope="module")
def precision_engines(tiny_pipeline_dir, tmp_path_factory):
    """Transformer-only bf16, fp8 and nvfp4 (emulated) engines of the tiny pipeline's transformer."""
    from fluxc.build import BuildOptions, build

    root = tmp_path_factory.mktemp("precisions")
    paths = {p: str(root / f"{p}.fluxe") for p in ("bf16", "fp8", "nvfp4")}
    for precision, path in paths.items():
        build(BuildOptions(model=tiny_pipeline_dir, output=path, target="cpu", precision=precision,
                           resolutions=((144, 112),), text_tokens=TINY_TEXT, transformer_only=True))
    return paths


def test_quantized_engines_keep_their_floor_with_an_adapter(precision_engines, adapters, loras, tiny_pipeline_dir):
    """The adapter file made against the fp32 engine fits every precision's engine. bf16: within bf16 noise of
    diffusers bf16 with the adapter; fp8 / nvfp4: the merge-then-re-quantize contract (numerics.ADAPTER_SQNR_LOSS_DB)
    above the precision's floor. Removing the adapter restores every weight bit for bit."""
    from diffusers import FluxPipeline

    from fluxc.runtime import Engine

    pipe = FluxPipeline.from_pretrained(tiny_pipeline_dir, torch_dtype=torch.bfloat16)
    embeds, pooled, noise = inputs(pipe)
    base = reference_latents(pipe, embeds, pooled, noise, torch.bfloat16)
    pipe.load_lora_weights(loras["a"])
    want = reference_latents(pipe, embeds, pooled, noise, torch.bfloat16)
    floors = {"fp8": FP8_SEGMENT_SQNR_DB, "nvfp4": NVFP4_SEGMENT_SQNR_DB}
    for precision, path in precision_engines.items():
        engine = Engine.load(path)
        before = {k: [t.clone() for t in ts] for k, ts in engine._weights.items()}
        plain = sqnr_db(engine_latents(engine, embeds, pooled, noise), base)
        engine.set_adapters([(adapters["a"], 1.0)])
        got = engine_latents(engine, embeds, pooled, noise)
        adapted = sqnr_db(got, want)
        print(f"tiny {precision} engine against diffusers bf16: {plain:.1f} dB, with the adapter {adapted:.1f} dB")
        if precision == "bf16":
            assert relative_error(got, want) <= RELATIVE_ERROR_FLOORS["bf16"]
        else:
            assert adapted >= max(plain - ADAPTER_SQNR_LOSS_DB, floors[precision]), (precision, plain, adapted)
        engine.set_adapters([])
        assert all(torch.equal(t.view(torch.uint8), b.view(torch.uint8))
                   for k, ts in engine._weights.items() for t, b in zip(ts, before[k]))


def test_served_requests_alternate_adapters(tiny_pipeline_b4_path, adapters):
    """fluxc serve --lora a=... --lora b=...: requests naming adapters in extra_body get the image the engine makes
    with those adapters set; unknown names are a 400; the metrics count each change of adapter set."""
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from test_serve import SIZE, fluxc_serve, png, post

    from fluxc.runtime import Engine

    engine = Engine.load(tiny_pipeline_b4_path)
    server = fluxc_serve(tiny_pipeline_b4_path, "--lora", f"a={adapters['a']}", "--lora", f"b={adapters['b']}")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
        assert client.models.list().data[0].adapters == ["a", "b"]
        sequence = [[{"name": "a"}], [{"name": "b", "scale": 0.5}], [{"name": "a"}], [],
                    [{"name": "a", "scale": 0.6}, {"name": "b", "scale": 0.4}]]
        for lora in sequence:
            result = client.images.generate(prompt=PROMPT, size=SIZE, extra_body={"steps": 2, "seed": 5, "lora": lora})
            engine.set_adapters([(adapters[ref["name"]], ref.get("scale", 1.0)) for ref in lora])
            want = engine.generate(PROMPT, height=144, width=112, steps=2, seed=5)[0]
            assert np.array_equal(png(result.data[0].b64_json), np.asarray(want)), lora
        assert server.metrics()["fluxc_adapter_swaps_total"] == len(sequence)
        r = post(server, {"prompt": "a cat", "lora": [{"name": "c"}]}, key="-")
        assert r.status_code == 400 and "No adapter named 'c'" in r.json()["error"]["message"]
    finally:
        assert server.stop() == 0


# ---- refit ------------------------------------------------------------------------------------------------------
def test_refit_equals_a_fresh_build(tiny_pipeline_engine_path, tiny_pipeline_dir, tmp_path):
    """A second checkpoint (seed 1) refitted onto the seed-0 engine: the same weights file and images as a fresh build
    of it, its compiled segments reused; another architecture is refused with the reason."""
    import time

    from fluxc.build import BuildOptions, build
    from fluxc.frontend.components import load_components, save_pipeline_folder
    from fluxc.frontend.models import load_model
    from fluxc.runtime import Engine
    from fluxc.runtime.core.bundle import read_manifest

    second = str(tmp_path / "second")
    model = load_model("tiny", dtype=torch.float32, device=torch.device("cpu"), seed=1)
    save_pipeline_folder(second, model.module, load_components("tiny", "flux1", dtype=torch.float32,
                                                               device=torch.device("cpu"), seed=1))
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["refit", tiny_pipeline_engine_path, "--model", second,
                                       "-o", str(tmp_path / "refit.fluxe")])
    refit_s = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    start = time.perf_counter()
    build(BuildOptions(model=second, output=str(tmp_path / "fresh.fluxe"), target="cpu", precision="fp32",
                       resolutions=((144, 112),), text_tokens=TINY_TEXT))
    print(f"refit {refit_s:.1f} s, fresh build {time.perf_counter() - start:.1f} s (warm Inductor cache)")
    refitted, fresh = (read_manifest(str(tmp_path / p)) for p in ("refit.fluxe", "fresh.fluxe"))
    assert refitted["files"]["weights.safetensors"] == fresh["files"]["weights.safetensors"]
    old = read_manifest(tiny_pipeline_engine_path)
    assert all(refitted["files"][f] == old["files"][f] for f in refitted["files"] if f.startswith("segments/"))
    assert refitted["numerics"].keys() == fresh["numerics"].keys()
    images = [Engine.load(str(tmp_path / p)).generate(PROMPT, seed=2, output_type="pt", **SAMPLING)
              for p in ("refit.fluxe", "fresh.fluxe")]
    assert torch.equal(images[0], images[1])
    assert not torch.equal(images[0], Engine.load(tiny_pipeline_engine_path).generate(
        PROMPT, seed=2, output_type="pt", **SAMPLING))

    result = CliRunner().invoke(main, ["refit", tiny_pipeline_engine_path, "--model", "tiny-flux2",
                                       "-o", str(tmp_path / "other.fluxe")])
    assert result.exit_code == 1 and "is not the architecture of" in result.output, result.output
    assert not os.path.exists(tmp_path / "other.fluxe")


# ---- FLUX.2 -------------------------------------------------------------------------------------------------------
def test_flux2_adapter_matches_diffusers(tmp_path, tiny_pipeline_engine_path):
    """tiny-flux2: a PEFT LoRA on every linear (the shared modulations hoisted into the head's schedule included),
    saved by Flux2Pipeline.save_lora_weights, converted by fluxc adapter: one transformer forward of the engine with
    the adapter against Flux2Transformer2DModel with it, within 1e-4; a FLUX.1 adapter is refused."""
    from diffusers import Flux2Pipeline

    from fluxc.build import BuildOptions, build
    from fluxc.frontend.models import load_model
    from fluxc.runtime import Engine
    from fluxc.runtime.core.errors import FluxcError
    from test_flux2 import SIZE, TEXT, transformer_inputs

    engine_path = str(tmp_path / "flux2.fluxe")
    build(BuildOptions(model="tiny-flux2", output=engine_path, target="cpu", precision="fp32", resolutions=(SIZE,),
                       text_tokens=TEXT, transformer_only=True))
    model = load_model("tiny-flux2", dtype=torch.float32, device=torch.device("cpu"), seed=0).module
    engine = Engine.load(engine_path)
    x, ids = transformer_inputs(engine, model)
    with torch.no_grad():
        base = model(**x, **ids, return_dict=False)[0]
    lora = save_lora(Flux2Pipeline, model, add_random_lora(model, 5), str(tmp_path / "lora"))
    result = CliRunner().invoke(main, ["adapter", engine_path, lora, "-o", str(tmp_path / "flux2.fluxa")])
    assert result.exit_code == 0, result.output
    with torch.no_grad():
        want = model(**x, **ids, return_dict=False)[0]
    engine.set_adapters([(str(tmp_path / "flux2.fluxa"), 1.0)])
    cos, sin = engine.rope(engine.profile_for(*SIZE))
    got = engine.transformer(engine.profile_for(*SIZE), dict(x, rope_cos=cos, rope_sin=sin))
    assert_close_report(got, want, rtol=1e-4, name="flux2 with adapter")
    assert relative_error(want, base) > 0.05
    with pytest.raises(FluxcError, match="is for flux2; this engine is flux1"):
        Engine.load(tiny_pipeline_engine_path).set_adapters([(str(tmp_path / "flux2.fluxa"), 1.0)])


# ---- bad input ----------------------------------------------------------------------------------------------------
def _edited(lora: str, path, edit) -> str:
    from safetensors.torch import load_file, save_file

    tensors = edit(load_file(lora))
    save_file(tensors, str(path))
    return str(path)


@pytest.mark.parametrize("edit, words", [
    (lambda t: t | {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
                    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4)},
     "also changes text_encoder"),
    (lambda t: {k.replace("transformer_blocks.0.", "transformer_blocks.7."): v for k, v in t.items()},
     "which this engine does not have"),
    (lambda t: {k: (v[:, :-16].contiguous() if k.endswith("x_embedder.lora_A.weight") else v) for k, v in t.items()},
     "the engine's weight is"),
    (lambda t: {k: v for k, v in t.items() if not k.endswith("x_embedder.lora_B.weight")}, "only one of the two"),
])
def test_adapters_that_do_not_fit_are_refused(edit, words, loras, tiny_pipeline_engine_path, tmp_path):
    """Each a one-paragraph error with its remedy, and no adapter file left behind."""
    lora = _edited(loras["a"], tmp_path / "bad.safetensors", edit)
    out = tmp_path / "bad.fluxa"
    result = CliRunner().invoke(main, ["adapter", tiny_pipeline_engine_path, lora, "-o", str(out)])
    assert result.exit_code == 1 and words in result.output and "remedy:" in result.output, result.output
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["bad.safetensors"]


def test_damaged_or_foreign_adapter_files_are_refused(adapters, loras, tiny_pipeline_engine_path, tmp_path):
    from fluxc.runtime import Engine
    from fluxc.runtime.core.errors import FluxcError

    engine = Engine.load(tiny_pipeline_engine_path)
    damaged = tmp_path / "damaged.fluxa"
    data = bytearray(open(adapters["a"], "rb").read())
    data[-3] ^= 0xFF  # a byte of the last tensor
    damaged.write_bytes(bytes(data))
    with pytest.raises(FluxcError, match="does not match its digest"):
        engine.set_adapters([(str(damaged), 1.0)])
    with pytest.raises(FluxcError, match="not a fluxc adapter"):
        engine.set_adapters([(loras["a"], 1.0)])
    with pytest.raises(FluxcError, match="scale must be a finite number"):
        engine.set_adapters([(adapters["a"], float("nan"))])
    assert engine.adapters == []
    result = CliRunner().invoke(main, ["run", tiny_pipeline_engine_path, "--prompt", "a cat", "--lora",
                                       f"{adapters['a']}:strong", "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "'strong' is not a scale" in result.output


def test_cli_run_with_lora_writes_the_adapted_image(tiny_pipeline_engine_path, adapters, tmp_path):
    from PIL import Image

    from fluxc.runtime import Engine

    out = str(tmp_path / "fox.png")
    result = CliRunner().invoke(main, ["run", tiny_pipeline_engine_path, "--prompt", PROMPT, "--steps", "4", "--seed",
                                       "2", "--lora", f"{adapters['a']}:0.8", "--lora", adapters["b"], "-o", out])
    assert result.exit_code == 0, result.output
    engine = Engine.load(tiny_pipeline_engine_path)
    engine.set_adapters([(adapters["a"], 0.8), (adapters["b"], 1.0)])
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(engine.generate(PROMPT, seed=2, **SAMPLING)[0]))
