"""Bench and eval records: what `fluxc bench` and `fluxc eval` write, and `fluxc compare` reads.

A record is one JSON object describing one engine on one machine:
    bench: {"kind": "bench", "name", "machine", "software", "engine", "settings", "speed"}
    eval:  {"kind": "eval",  "name", "machine", "software", "engine", "settings", "reference", "quality"}
Records made on different machines merge in `fluxc compare` by name; "settings" (resolution, steps, batch)
say what was measured, so mismatched records are flagged there instead of compared.
"""

import os
import platform
import statistics
import subprocess
import time

import numpy as np
import torch

from fluxc import __version__
from fluxc.numerics import psnr_db, sqnr_db, ssim
from fluxc.runtime import Engine
from fluxc.runtime.core.bundle import WEIGHTS
from fluxc.runtime.core.targets import local_target
from fluxc.runtime.loop import chunked
from fluxc.runtime.core.errors import FluxcError

RECORD_VERSION = 1
DEFAULT_PROMPTS = ("a photo of a red fox in fresh snow, morning light",
                   "an isometric illustration of a tiny city on a floating island")


def machine_info() -> dict:
    """The GPU (name, SM, memory, driver and clocks as nvidia-smi reports them) or the CPU."""
    if not torch.cuda.is_available():
        return {"gpu": None, "sm": "cpu", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    props = torch.cuda.get_device_properties(0)
    info = {"gpu": props.name, "sm": local_target(), "memory_gib": props.total_memory / 2**30}
    query = "driver_version,clocks.max.sm,clocks.max.memory,clocks.sm,power.limit"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        driver, sm_max, mem_max, sm_now, power = (v.strip() for v in out.split(","))
        info |= {"driver": driver, "clocks_mhz": {"sm_max": float(sm_max), "memory_max": float(mem_max),
                                                  "sm_at_start": float(sm_now)}, "power_limit_w": float(power)}
    except (OSError, ValueError, subprocess.TimeoutExpired):
        info["driver"] = None  # no nvidia-smi: the rest is still right
    return info


def software_info() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"fluxc": __version__, "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "python": platform.python_version()}


def engine_info(engine: Engine) -> dict:
    m = engine.manifest
    return {"path": os.path.basename(os.path.normpath(engine.path)), "cache_key": m["cache_key"],
            "precision": m["precision"], "precision_mode": m.get("precision_mode", "native"),
            "recipe": m["recipe"]["name"], "target": m["target"]["sm"], "built_on": m["target"]["device"],
            "model": m["model"]["source"], "pipeline": engine.components is not None,
            "build_s": sum(m["build_seconds"].values()),
            "weights_gb": os.path.getsize(os.path.join(engine.path, WEIGHTS)) / 1e9}


def _header(kind: str, name: str | None, engine: Engine, settings: dict) -> dict:
    return {"kind": kind, "version": RECORD_VERSION, "name": name or engine_info(engine)["path"],
            "machine": machine_info(), "software": software_info(), "engine": engine_info(engine),
            "settings": settings, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _inputs(engine: Engine, profile, prompts: list[str], seed: int):
    """Prompt embeddings (the engine's encoders; seeded random ones for a transformer-only engine) and noise."""
    if engine.components is not None:
        embeds, pooled = engine.encode_prompt(prompts)
    else:
        g = torch.Generator().manual_seed(seed + 1)
        embeds = torch.randn(len(prompts), profile.text_tokens, engine.config["joint_attention_dim"], generator=g)
        pooled = (torch.randn(len(prompts), engine.config["pooled_projection_dim"], generator=g)
                  if engine.family.pooled else None)  # FLUX.2 conditions on prompt_embeds alone
    noise = engine.family.initial_noise(len(prompts), profile, engine.latent_channels, seed, engine.dtype)
    return embeds, pooled, noise


@torch.no_grad()
def bench(engine: Engine, *, height=None, width=None, steps: int = 28, batch: int = 1, warmup: int = 1,
          repeat: int = 3, guidance: float = 3.5, name: str | None = None, load_s: float | None = None,
          cache_config=None, on_generation=None) -> dict:
    """A bench record: ms per step (median, p10, p90 over every step of `repeat` loops, CUDA events on a GPU),
    end-to-end seconds per stage (whole-pipeline engines), peak GPU memory, build and load time.
    on_generation(), if given, is called after each generation (warm-ups included): for progress bars."""
    profile = engine.profile_for(height, width)
    if batch % profile.batch:
        raise FluxcError(f"--batch {batch} is not a multiple of the engine's static batch {profile.batch}.",
                         f"Use --batch {profile.batch} or a multiple of it.")
    prompts = [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(batch)]
    config = cache_config or engine.cache_config()
    settings = {"resolution": profile.name, "steps": steps, "batch": batch, "guidance": guidance,
                "warmup": warmup, "repeat": repeat, "cache": config.policy}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    step_ms, stages = [], []
    for i in range(warmup + repeat):
        times, loop_ms = {}, []
        run = dict(height=profile.height, width=profile.width, steps=steps, guidance=guidance, cache_config=config,
                   step_ms=loop_ms)
        if engine.components is not None:  # prompt to image: the stages' seconds, and each step's ms
            engine.generate(prompts, seed=i, timings=times, **run)
        else:
            embeds, pooled, noise = _inputs(engine, profile, prompts, seed=i)
            if pooled is None:
                chunked(lambda e, z: [engine.denoise(e, None, latents=z, **run)], profile.batch, embeds, noise)
            else:
                chunked(lambda e, p, z: [engine.denoise(e, p, latents=z, **run)], profile.batch, embeds, pooled, noise)
        if i >= warmup:
            step_ms += loop_ms
            stages.append(times)
        if on_generation is not None:
            on_generation()
    q = statistics.quantiles(step_ms, n=10) if len(step_ms) > 1 else [step_ms[0]] * 9
    speed = {"ms_per_step": {"median": statistics.median(step_ms), "p10": q[0], "p90": q[-1], "samples": len(step_ms)},
             "load_s": load_s, "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
    if engine.components is not None:
        speed["e2e_s"] = {k: statistics.median(t[k] for t in stages) for k in ("encode", "denoise", "decode")}
        speed["e2e_s"]["total"] = sum(speed["e2e_s"].values())
    return _header("bench", name, engine, settings) | {"speed": speed}


@torch.no_grad()
def evaluate(engine: Engine, reference: "Engine | str", *, prompts: list[str] | None = None, seeds: int = 1,
             height=None, width=None, steps: int = 28, guidance: float = 3.5, name: str | None = None,
             on_item=None) -> dict:
    """An eval record: latent SQNR, image PSNR and SSIM of `engine` against `reference` (an engine, or "eager":
    diffusers' FluxPipeline in bf16 on the engine's model source) for the same prompts, seeds and noise.
    on_item(), if given, is called after each prompt and seed: for progress bars."""
    if engine.components is None:
        raise FluxcError("fluxc eval compares images; this engine was built with --transformer-only.",
                         "Rebuild it without --transformer-only.")
    profile = engine.profile_for(height, width)
    prompts = list(prompts or DEFAULT_PROMPTS)
    run_reference = _eager_runner(engine, profile, steps, guidance) if reference == "eager" else \
        _engine_runner(reference, profile, steps, guidance)
    run_engine, items = _engine_runner(engine, profile, steps, guidance), []
    for prompt in prompts:
        for seed in range(seeds):
            latents, image = run_engine(prompt, seed)
            ref_latents, ref_image = run_reference(prompt, seed)
            items.append({"prompt": prompt, "seed": seed, "latent_sqnr_db": sqnr_db(latents, ref_latents),
                          "image_psnr_db": psnr_db(image, ref_image), "ssim": ssim(image, ref_image)})
            if on_item is not None:
                on_item()
    mean = {k: float(np.mean([it[k] for it in items])) for k in ("latent_sqnr_db", "image_psnr_db", "ssim")}
    settings = {"resolution": profile.name, "steps": steps, "batch": 1, "guidance": guidance,
                "prompts": len(prompts), "seeds": seeds}
    ref = {"name": "eager", "what": "diffusers FluxPipeline, bf16"} if reference == "eager" else \
        {"name": engine_info(reference)["path"], "engine": engine_info(reference)}
    return _header("eval", name, engine, settings) | {"reference": ref, "quality": {"mean": mean, "items": items}}


def _engine_runner(engine: Engine, profile, steps: int, guidance: float):
    def run(prompt: str, seed: int):
        embeds, pooled, noise = _inputs(engine, profile, [prompt], seed)
        latents = engine.denoise(embeds, pooled, height=profile.height, width=profile.width, steps=steps,
                                 guidance=guidance, latents=noise)
        return latents.float().cpu(), engine.decode(latents, profile)[0].numpy()

    return run


def _eager_runner(engine: Engine, profile, steps: int, guidance: float):
    """diffusers' FluxPipeline over the engine's model source, bf16, on the engine's device."""
    from diffusers import FluxPipeline

    from fluxc.frontend.components import diffusers_pipeline, load_components
    from fluxc.frontend.models import load_model

    source = engine.manifest["model"]["source"]
    if engine.family.name != "flux1":
        raise FluxcError(f"--reference eager runs diffusers' FluxPipeline, a FLUX.1 pipeline; this engine is "
                         f"{engine.family.name}.", "Pass --reference ENGINE (e.g. a bf16 engine of the same model).")
    if source["kind"] not in ("random", "diffusers"):
        raise FluxcError(f"--reference eager needs a diffusers folder or a named architecture; this engine was "
                         f"built from a {source['kind']} checkpoint.", "Pass --reference ENGINE instead.")
    # a diffusers source records its transformer/ folder; the pipeline root holds the other components
    where = source["name"] if source["kind"] == "random" else os.path.dirname(source["path"])
    kw = dict(dtype=torch.bfloat16, device=engine.device, seed=source.get("seed", 0))
    model = load_model(where, **kw)
    pipe = diffusers_pipeline(model.module, load_components(where, model.family, **kw))
    text = profile.text_tokens  # the engine's T5 length

    def run(prompt: str, seed: int):
        noise = engine.family.initial_noise(1, profile, engine.latent_channels, seed, torch.bfloat16)
        latents = pipe(prompt, height=profile.height, width=profile.width, num_inference_steps=steps,
                       guidance_scale=guidance, max_sequence_length=text, latents=noise.to(engine.device),
                       output_type="latent").images
        unpacked = FluxPipeline._unpack_latents(latents, profile.height, profile.width, pipe.vae_scale_factor)
        unpacked = unpacked / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.image_processor.postprocess(pipe.vae.decode(unpacked, return_dict=False)[0], output_type="np")
        return latents.float().cpu(), image[0]

    return run
