import click


@click.command("doctor")
def command():
    """Print what this machine can build and run: GPU, SM, precisions, backends, TensorRT.

    Typical use: fluxc doctor
    """
    from fluxc.doctor import report

    for topic, finding in report():
        click.echo(f"{topic:<18} {finding}")
