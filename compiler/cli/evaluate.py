import click


@click.command("eval")
@click.argument("engine", type=click.Path())
@click.option("--reference", required=True, help="An engine to compare with, or 'eager' (diffusers FluxPipeline, bf16).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None,
              help="One prompt per line (default: two built-in prompts).")
@click.option("--seeds", type=int, default=1, show_default=True, help="Seeds 0..N-1 per prompt.")
@click.option("--resolution", default=None, help="HxW of one of the engine's profiles (default: its first).")
@click.option("--steps", type=int, default=28, show_default=True)
@click.option("--guidance", type=float, default=3.5, show_default=True)
@click.option("--name", default=None, help="The record's name in fluxc compare (default: the engine folder's name).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="JSON record to write.")
def command(engine, reference, prompts_file, seeds, resolution, steps, guidance, name, output):
    """Image quality against a reference: latent SQNR, image PSNR and SSIM per prompt and seed -> JSON.

    Typical use: fluxc eval dev-fp8.fluxe --reference dev-bf16.fluxe --seeds 2 -o h200-fp8-quality.json
    """
    from fluxc.validate import parse_resolution
    from fluxc.cli.progress import progress_bar
    from fluxc.cli.records_io import write_record
    from fluxc.cli.run import _read_prompts
    from fluxc.records import DEFAULT_PROMPTS, evaluate
    from fluxc.runtime import Engine
    from fluxc.runtime.core.bundle import check_writable
    from fluxc.runtime.core.errors import FluxcError

    if seeds < 1 or steps < 1:
        raise FluxcError("--seeds and --steps must be at least 1.", "e.g. --seeds 2 --steps 28.")
    check_writable(output)
    height, width = parse_resolution(resolution) if resolution else (None, None)
    prompts = _read_prompts(prompts_file) if prompts_file else None
    eng = Engine.load(engine)
    ref = reference if reference == "eager" else Engine.load(reference)
    with progress_bar(len(prompts or DEFAULT_PROMPTS) * seeds, "images") as advance:
        record = evaluate(eng, ref, prompts=prompts, seeds=seeds, height=height, width=width, steps=steps,
                          guidance=guidance, name=name, on_item=advance)
    write_record(output, record)
    mean = record["quality"]["mean"]
    click.echo(f"wrote {output}: {record['name']} vs {record['reference']['name']}: latent SQNR "
               f"{mean['latent_sqnr_db']:.1f} dB, PSNR {mean['image_psnr_db']:.1f} dB, SSIM {mean['ssim']:.3f} "
               f"over {len(record['quality']['items'])} images")
