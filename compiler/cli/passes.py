import click


@click.command("passes")
@click.option("--target", default="auto", show_default=True)
@click.option("--precision", default="bf16", show_default=True)
@click.option("--recipe", default=None)
def command(target, precision, recipe):
    """Print the resolved pass pipeline for a target and precision.

    Typical use: fluxc passes --target sm_90 --precision bf16
    """
    from fluxc.recipes import DEFAULT_FOR_PRECISION, RECIPES, Precision
    from fluxc.passes.pipeline import resolve
    from fluxc.runtime.device import local_target
    from fluxc.runtime.errors import FluxcError

    try:
        name = recipe or DEFAULT_FOR_PRECISION[Precision(precision)]
        rec = RECIPES[name]()
    except (ValueError, KeyError):
        raise FluxcError(f"No recipe for precision '{precision}' / recipe '{recipe}'.",
                         "Use --precision fp32 or bf16, or a recipe from `fluxc.recipes.RECIPES`.") from None
    target = local_target() if target == "auto" else target
    click.echo(f"# recipe {rec.name} ({rec.precision.value}) for {target}")
    for i, p in enumerate(resolve(rec, target), start=1):
        click.echo(f"{i:2d}. [{p.phase}] {p.name}")
