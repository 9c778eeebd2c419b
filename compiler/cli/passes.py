import click


@click.command("passes")
@click.option("--target", default="auto", show_default=True, help="cpu, sm_90, sm_100, sm_120 or auto (this machine).")
@click.option("--precision", default=None, help="fp32 | bf16 | fp8 | nvfp4 (default: the recipe's, else bf16).")
@click.option("--recipe", default=None, help="Named recipe; it implies its precision.")
def command(target, precision, recipe):
    """Print the resolved pass pipeline for a target and precision (or recipe).

    Typical use: fluxc passes --target sm_100 --precision nvfp4
    """
    from fluxc.validate import BuildOptions, choose_recipe
    from fluxc.passes.pipeline import resolve
    from fluxc.runtime.core import targets

    rec = choose_recipe(BuildOptions(model="", output="", precision=precision, recipe=recipe))
    target = targets.local_target() if target == "auto" else target
    targets.sm(target)  # a FluxcError for a name that is no target
    click.echo(f"# recipe {rec.name} ({rec.precision.value}) for {target}")
    for i, p in enumerate(resolve(rec, target), start=1):
        click.echo(f"{i:2d}. [{p.phase}] {p.name}" + (f": {p.detail}" if p.detail else ""))
