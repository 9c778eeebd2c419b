import click


@click.command("adapter")
@click.argument("engine", type=click.Path())
@click.argument("lora", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The adapter file (NAME.fluxa).")
def command(engine, lora, output):
    """Convert a published LoRA (diffusers/PEFT, kohya, XLabs, BFL) into an adapter file for ENGINE's model.

    Typical use: fluxc adapter dev.fluxe style.safetensors -o style.fluxa, then fluxc run dev.fluxe --lora
    style.fluxa:0.8 ... or Engine.set_adapters([("style.fluxa", 0.8)]). One adapter file fits every engine of the
    same model (bf16, fp8, nvfp4); nothing is recompiled.
    """
    import os

    from fluxc.adapter import make_adapter

    entry = make_adapter(engine, lora, output)
    click.echo(f"wrote {output} ({os.path.getsize(output) / 2**20:.1f} MiB): {entry['linears']} linears, "
               f"rank {'/'.join(map(str, entry['ranks']))}, from {entry['source']['file']}")
