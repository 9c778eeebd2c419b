import click

from fluxc.cli.cache_options import cache_options, cache_overrides


@click.command("run")
@click.argument("engine", type=click.Path())
@click.option("--prompt", default=None, help="Text prompt; writes an image.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None,
              help="File with one prompt per line; writes OUTPUT-000.png, OUTPUT-001.png, ...")
@click.option("--embeddings", type=click.Path(), default=None,
              help="Instead of a prompt: safetensors with prompt_embeds [B,T,D] and pooled_prompt_embeds [B,P]; "
                   "writes latents. Without --prompt, --prompts or --embeddings: seeded random embeddings.")
@click.option("--height", type=int, default=None, help="Default: the engine's first profile.")
@click.option("--width", type=int, default=None)
@click.option("--steps", type=int, default=28, show_default=True)
@click.option("--guidance", type=float, default=3.5, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True)
@click.option("--encoders", type=click.Choice(["gpu", "offload", "cpu"]), default=None,
              help="Where the text encoders stay between prompts (default: as built).")
@cache_options
@click.option("--cache-schedule", default=None, metavar="STEPS",
              help="Measurement: skip exactly these steps (e.g. 2,4,6) instead of the policy's decisions.")
@click.option("-v", "--verbose", is_flag=True, help="Also print which steps the cache skipped.")
@click.option("--gpus", type=int, default=1, show_default=True, metavar="N",
              help="Run an engine built with --world-size N on N GPUs of this machine (ranks launched through "
                   "torchrun's launcher; rank 0 writes the images). Under your own launcher: torchrun "
                   "--nproc-per-node N -m fluxc.runtime ENGINE --prompt ... -o OUT.")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False),
              help="Ed25519 public key (PEM); repeat for several. Given, the engine must be signed by one of them.")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False),
              help="Start from this image (--tasks img2img, inpaint, fill), or edit it (kontext; repeat for a FLUX.2 "
                   "engine's references).")
@click.option("--mask", type=click.Path(dir_okay=False), default=None,
              help="With --image: inpaint; white repaints, black keeps (an engine built with --tasks ...,inpaint).")
@click.option("--strength", type=float, default=0.6, show_default=True,
              help="With --image: the share of the steps that run (1: keep only the image's size).")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="A LoRA adapter (.fluxa from `fluxc adapter`) at a scale (default 1); repeat for several.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Image out (.png, .jpg, .webp), or latents (.safetensors) from embeddings.")
def command(engine, prompt, prompts_file, embeddings, height, width, steps, guidance, seed, encoders, cache_schedule,
            verbose, gpus, trusted_keys, images, mask, strength, loras, output, **cache):
    """Generate images from prompts with an engine (or latents from prompt embeddings).

    Typical use: fluxc run dev.fluxe --prompt "a photo of a cat" --steps 28 --seed 0 -o cat.png
    """
    from fluxc.runtime.core.cache_config import check_schedule, parse_schedule
    from fluxc.runtime.core.errors import FluxcError

    overrides = cache_overrides(**cache, schedule=parse_schedule(cache_schedule))
    load = dict(encoders=encoders, trusted_keys=list(trusted_keys) or None, adapters=parse_loras(loras))
    if "schedule" in overrides:
        check_schedule(overrides["schedule"], steps)  # before any loading
    if prompt is not None and prompts_file is not None:
        raise FluxcError("Both --prompt and --prompts were given.", "Pass one of them.")
    if (prompt is not None or prompts_file is not None) and embeddings is not None:
        raise FluxcError("--embeddings replaces the text encoders; it cannot be combined with a prompt.",
                         "Pass either a prompt or --embeddings.")
    if prompt is None and prompts_file is None:
        _check_latents_output(output)
        return _latents_from_embeddings(engine, load, embeddings, height, width, steps, guidance, seed, output,
                                        overrides, verbose)
    prompts = [prompt] if prompt is not None else _read_prompts(prompts_file)
    paths = _image_paths(output, len(prompts))

    from fluxc.runtime import parallel

    settings = dict(height=height, width=width, steps=steps, guidance=guidance, seed=seed)
    if images:
        read = [_read_image(path) for path in images]
        settings |= dict(image=read[0] if len(read) == 1 else read, strength=strength)
        if mask is not None:
            settings["mask"] = _read_image(mask).convert("L")
    elif mask is not None:
        raise FluxcError("--mask needs --image (the image the mask belongs to).", "Add --image IMAGE.")
    if gpus < 1:
        raise FluxcError(f"--gpus {gpus} is less than 1.", "Use --gpus 1 or the engine's world size.")
    if gpus > 1 and parallel.world_size() == 1:
        _check_world(engine, gpus)  # before any rank starts
        images, timings, report = parallel.launch(gpus, _generate, engine, load, prompts, settings, overrides)
    else:  # one process, or one rank of a group started by the user's torchrun
        images, timings, report = _generate(engine, load, prompts, settings, overrides)
        if parallel.rank() != 0:
            return
    from fluxc.runtime.core.bundle import save_atomically

    for image, path in zip(images, paths):
        save_atomically(path, image.save)
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
    click.echo(f"wrote {len(paths)} image(s) ({paths[0]}{' ...' if len(paths) > 1 else ''}): {steps} steps, {stages}")
    _echo_cache(report, verbose)


def _generate(engine: str, load: dict, prompts: list[str], settings: dict, overrides: dict):
    """(images, stage timings, cache report) of Engine.generate, on this process (a rank, for --gpus N); rank 0
    shows the denoising steps' progress."""
    from fluxc.cli.progress import progress_bar
    from fluxc.runtime import parallel

    eng = load_engine(engine, load)
    timings, report = {}, {}
    profile = eng.profile_for(settings["height"], settings["width"])
    chunks, steps = -(-len(prompts) // profile.batch), settings["steps"]
    if "image" in settings and not profile.references:  # image to image runs the last steps of the schedule only
        steps -= eng.check_image(settings["image"], len(prompts), profile, steps, settings["strength"],
                                 settings.get("mask"))[1]
    with progress_bar(steps * chunks, "denoise", show=parallel.rank() == 0) as advance:
        images = eng.generate(prompts, **settings, timings=timings, cache_config=eng.cache_config(**overrides),
                              report=report, on_step=advance)
    return images, timings, report


def _read_image(path: str):
    """The --image file as an RGB PIL image (an RGBA or grey file is converted, as a user expects)."""
    from PIL import Image, UnidentifiedImageError

    from fluxc.runtime.core.errors import FluxcError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise FluxcError(f"Cannot read --image '{path}': {e}.", "Pass a PNG, JPEG or WebP file.") from None


def parse_loras(loras) -> list[tuple[str, float]]:
    """--lora FILE[:SCALE] values -> [(file, scale)], checked before any loading."""
    import os

    from fluxc.runtime.core.errors import FluxcError

    out = []
    for value in loras:
        path, _, scale = value.rpartition(":") if ":" in value else (value, "", "1")
        try:
            out.append((path, float(scale)))
        except ValueError:
            raise FluxcError(f"--lora {value}: {scale!r} is not a scale.", "Write --lora FILE or --lora FILE:0.8.") from None
        if not os.path.isfile(path):
            raise FluxcError(f"--lora {value}: no adapter file at '{path}'.",
                             "Make one with `fluxc adapter ENGINE LORA.safetensors -o NAME.fluxa`.")
    return out


def load_engine(engine: str, load: dict):
    """Engine.load with `load`'s options, then its adapters set."""
    from fluxc.runtime import Engine

    options = dict(load)
    adapters = options.pop("adapters", [])
    eng = Engine.load(engine, **options)
    if adapters:
        eng.set_adapters(adapters)
    return eng


def _echo_cache(report: dict, verbose: bool) -> None:
    if "cache" in report:
        r = report["cache"]
        click.echo(f"cache {r['policy']} (threshold {r['threshold']:g}): {len(r['skipped_steps'])} of "
                   f"{len(r['skipped_steps']) + r['full_steps']} steps skipped"
                   + (f": {r['skipped_steps']}" if verbose else ""))


def _read_prompts(path: str) -> list[str]:
    from fluxc.runtime.core.errors import FluxcError

    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise FluxcError(f"Cannot read prompts from '{path}': {e}.", "Pass a UTF-8 text file, one prompt per line.") from None
    if not prompts:
        raise FluxcError(f"'{path}' holds no prompts.", "Write one prompt per line.")
    return prompts


def _image_paths(output: str, n: int) -> list[str]:
    """The files to write, checked before any work: a known image extension and a folder that takes them."""
    import os

    from PIL import Image

    from fluxc.runtime.core.bundle import check_writable
    from fluxc.runtime.core.errors import FluxcError

    stem, ext = os.path.splitext(output)
    if ext.lower() == ".safetensors":
        raise FluxcError(f"'{output}' is a latents file, but a prompt was given: prompts make images.",
                         "Name the output like out.png, or pass --embeddings to write latents.")
    if ext.lower() not in Image.registered_extensions():
        raise FluxcError(f"Cannot tell an image format from '{output}'.", "Name the output like out.png.")
    check_writable(output)
    return [output] if n == 1 else [f"{stem}-{i:03d}{ext}" for i in range(n)]


def _check_latents_output(output: str) -> None:
    """Without a prompt, run writes latents: a .safetensors file (an image name means a forgotten --prompt)."""
    from fluxc.runtime.core.bundle import check_writable
    from fluxc.runtime.core.errors import FluxcError

    if not output.lower().endswith(".safetensors"):
        raise FluxcError(f"No --prompt or --prompts was given, so run would write latents, but '{output}' is not "
                         "a .safetensors file.", "Add --prompt \"...\" for an image, or name the output "
                         "latents.safetensors to write latents from --embeddings (or seeded random ones).")
    check_writable(output)


def _check_world(engine: str, gpus: int) -> None:
    """The engine exists and was built for `gpus` ranks: checked in this process, before launching any rank."""
    from fluxc.runtime.core.bundle import read_manifest
    from fluxc.runtime.core.errors import FluxcError

    built = read_manifest(engine)["profiles"][0]["world_size"]
    if built != gpus:
        raise FluxcError(f"This engine was built for {built} rank(s) (--world-size {built}); --gpus {gpus} was given.",
                         f"Use --gpus {built}, or rebuild with --world-size {gpus}.")


def _latents_from_embeddings(engine, load, embeddings, height, width, steps, guidance, seed, output, overrides, verbose):
    import time

    import torch
    from safetensors.torch import save_file

    from fluxc.runtime.core.bundle import save_atomically

    eng = load_engine(engine, load)
    profile = eng.profile_for(height, width)
    prompt_embeds, pooled = _embeddings(embeddings, eng, profile, seed)
    from fluxc.cli.progress import progress_bar

    start, report = time.perf_counter(), {}
    with progress_bar(steps, "denoise") as advance:
        packed = eng.denoise(prompt_embeds, pooled, height=profile.height, width=profile.width, steps=steps,
                             guidance=guidance, seed=seed, cache_config=eng.cache_config(**overrides), report=report,
                             on_step=advance)
    if packed.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tensors = {"packed_latents": packed.cpu().contiguous(),
               "latents": eng.family.unpack_latents(packed, profile).cpu().contiguous()}
    meta = {"height": str(profile.height), "width": str(profile.width), "steps": str(steps)}
    save_atomically(output, lambda path: save_file(tensors, path, metadata=meta))
    click.echo(f"wrote {output}: {steps} steps at {profile.name} in {seconds:.2f} s")
    _echo_cache(report, verbose)


def _embeddings(path, eng, profile, seed):
    import torch

    from fluxc.runtime.core.errors import FluxcError

    if path is None:  # seeded random embeddings, for smoke tests and benchmarks
        gen = torch.Generator().manual_seed(seed + 1)
        t = torch.randn(profile.batch, profile.text_tokens, eng.config["joint_attention_dim"], generator=gen)
        pooled = torch.randn(profile.batch, eng.config["pooled_projection_dim"], generator=gen) if eng.family.pooled else None
        return t, pooled
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise FluxcError(f"Cannot read embeddings '{path}': {e}.", "Pass a safetensors file.") from None
    wanted = {"prompt_embeds", "pooled_prompt_embeds"} if eng.family.pooled else {"prompt_embeds"}
    missing = wanted - set(tensors)
    if missing:
        raise FluxcError(f"'{path}' lacks {sorted(missing)}.",
                         f"Save {' and '.join(sorted(wanted))} (the pipeline's encode_prompt outputs).")
    return tensors["prompt_embeds"], tensors.get("pooled_prompt_embeds") if eng.family.pooled else None
