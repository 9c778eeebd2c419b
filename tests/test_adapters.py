"""LoRA adapters (fluxc adapter, Engine.set_adapters): the engine with an adapter against diffusers' FluxPipeline
after load_lora_weights, from the same folder, prompt embeddings and noise.

The LoRAs are made by PEFT on the tiny transformer (every linear, rank 4, alpha 8: scale 2) and saved by diffusers'
save_lora_weights; the kohya and XLabs fixtures hold the same adapter in those key layouts, and each is checked by
its round trip through diffusers' converters before it is used.
"""

import os

import pytest
import torch
from click.testing import CliRunner

from conftest import TINY_TEXT
from fluxc.cli import main
from fluxc.numerics import assert_close_report, relative_error, sqnr_db

SAMPLING = dict(height=144, width=112, steps=4, guidance=3.5)
PROMPT = "a watercolor fox in the snow"


def peft_lora(pipeline_dir: str, path: str, seed: int, targets=None, rank: int = 4, alpha: int = 8) -> str:
    """A PEFT LoRA on the tiny transformer's linears (`targets`: module-name regex, default every linear), its
    up factors drawn small (a real adapter moves weights by a few percent), saved by diffusers with its metadata."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = FluxTransformer2DModel.from_pretrained(pipeline_dir, subfolder="transformer")
    linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=targets or linears)
    transformer.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "lora_A" in name else 0.01))
    os.makedirs(path, exist_ok=True)
    FluxPipeline.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                   transformer_lora_adapter_metadata=config.to_dict())
    return os.path.join(path, "pytorch_lora_weights.safetensors")


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
