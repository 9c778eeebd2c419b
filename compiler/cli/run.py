import click


@click.command("run")
@click.argument("engine", type=click.Path())
@click.option("--embeddings", type=click.Path(), default=None,
              help="safetensors file with prompt_embeds [B,T,D] and pooled_prompt_embeds [B,P]; default: seeded random.")
@click.option("--height", type=int, default=None, help="Default: the engine's first profile.")
@click.option("--width", type=int, default=None)
@click.option("--steps", type=int, default=28, show_default=True)
@click.option("--guidance", type=float, default=3.5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Latents out (.safetensors).")
def command(engine, embeddings, height, width, steps, guidance, seed, output):
    """Run the denoising loop of an engine from prompt embeddings; write the latents.

    Typical use: fluxc run dev.fluxe --embeddings prompt.safetensors --steps 28 -o latents.safetensors
    """
    import time

    import torch
    from safetensors.torch import save_file

    from fluxc.runtime import Engine
    from fluxc.runtime.flux_math import unpack_latents

    eng = Engine.load(engine)
    first = next(iter(eng.profiles.values()))
    profile = eng.profile_for(height or first.height, width or first.width)
    prompt_embeds, pooled = _embeddings(embeddings, eng, profile, seed)
    start = time.perf_counter()
    packed = eng.denoise(prompt_embeds, pooled, height=profile.height, width=profile.width, steps=steps,
                         guidance=guidance, seed=seed)
    if packed.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    save_file({"packed_latents": packed.cpu().contiguous(),
               "latents": unpack_latents(packed, profile.height, profile.width).cpu().contiguous()},
              output, metadata={"height": str(profile.height), "width": str(profile.width), "steps": str(steps)})
    click.echo(f"wrote {output}: {steps} steps at {profile.name} in {seconds:.2f} s")


def _embeddings(path, eng, profile, seed):
    import torch

    from fluxc.runtime.errors import FluxcError

    if path is None:  # seeded random embeddings, for smoke tests and benchmarks
        gen = torch.Generator().manual_seed(seed + 1)
        t = torch.randn(profile.batch, profile.text_tokens, eng.config["joint_attention_dim"], generator=gen)
        return t, torch.randn(profile.batch, eng.config["pooled_projection_dim"], generator=gen)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise FluxcError(f"Cannot read embeddings '{path}': {e}.", "Pass a safetensors file.") from None
    missing = {"prompt_embeds", "pooled_prompt_embeds"} - set(tensors)
    if missing:
        raise FluxcError(f"'{path}' lacks {sorted(missing)}.",
                         "Save prompt_embeds and pooled_prompt_embeds (FluxPipeline.encode_prompt outputs).")
    return tensors["prompt_embeds"], tensors["pooled_prompt_embeds"]
