import click


@click.command("compare")
@click.argument("records", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--baseline", default=None, help="Row the speed ratios are to: NAME or NAME@GPU (default: the first bench record).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Also save a latency/quality chart (PNG).")
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "json"]), default="md", show_default=True)
def command(records, baseline, plot, fmt):
    """One table from bench and eval records, across engines, precisions and GPUs.

    Typical use: fluxc compare results/*.json --baseline h200-bf16 --plot compare.png
    """
    from fluxc.compare import load_records, plot as save_plot, render, rows

    table = rows(load_records(list(records)), baseline)
    click.echo(render(table, fmt), nl=False)
    if plot:
        save_plot(table, plot)
        click.echo(f"wrote {plot}", err=True)
