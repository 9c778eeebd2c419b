import click


@click.command("refit")
@click.argument("engine", type=click.Path())
@click.option("--model", required=True, help="The fine-tuned checkpoint: a diffusers folder or a BFL .safetensors file.")
@click.option("--sign-key", type=click.Path(dir_okay=False), default=None,
              help="Ed25519 private key (PEM) to sign the new engine with.")
@click.option("-o", "--output", required=True, type=click.Path(), help="The new engine (NEW.fluxe).")
def command(engine, model, sign_key, output):
    """Make ENGINE's weights again from a fine-tuned checkpoint of the same architecture, reusing its compiled
    segments: the build without the compilation, numerics check included.

    Typical use: fluxc refit dev.fluxe --model ./my-finetune -o my-finetune.fluxe
    """
    from fluxc.cli.progress import stage_reporter
    from fluxc.refit import refit

    manifest = refit(engine, model, output, sign_key, report=stage_reporter("refit"))
    seconds = manifest["build_seconds"]
    click.echo(f"wrote {output}: weights remade in {sum(seconds.values()):.1f} s, compiled segments of {engine} reused")
