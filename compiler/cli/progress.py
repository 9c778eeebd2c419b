"""Progress bars for the long commands (run, bench, eval), on stderr with an ETA (click's bar)."""

import sys
from contextlib import contextmanager

import click


@contextmanager
def progress_bar(total: int, label: str, show: bool = True):
    """Yield advance(*_): one unit of `total` done. It waits for the GPU first, so that the bar follows the work and
    not the launches (one host sync per unit: a step or a generation). show=False yields a no-op (other ranks)."""
    if not show:
        yield lambda *_: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True, show_pos=True) as bar:
        def advance(*_):
            import torch

            if torch.cuda.is_available():
                torch.cuda.current_stream().synchronize()
            bar.update(1)

        yield advance


def stage_reporter(command: str):
    """report(stage, done) for a build's stages (fluxc.build.Stages): one line as each starts and ends, on stderr."""
    def report(stage, done):
        click.echo(f"  done {stage}" if done else f"[{command}] {stage} ...", err=True)

    return report
