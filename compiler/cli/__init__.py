"""The `fluxc` command line: a click group, one module per command.

Every command ends with one line `PASSED|FAILED | seconds | command`. A FluxcError is printed as one
paragraph with its remedy and exits 1 with no traceback; any other exception is a bug and keeps it.
"""

import shlex
import sys
import time

import click

from fluxc import __version__
from fluxc.runtime.core.errors import FluxcError


class _Group(click.Group):
    def invoke(self, ctx):
        start = time.perf_counter()
        command = "fluxc " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "fluxc"
        status = "FAILED"
        try:
            result = super().invoke(ctx)
            status = "PASSED"
            return result
        except FluxcError as e:
            click.echo(f"error: {e.message}" + (f"\n  remedy: {e.remedy}" if e.remedy else ""), err=True)
            ctx.exit(1)
        except click.exceptions.Exit as e:  # --help, --version: no work was done, so no status line
            status = None if e.exit_code == 0 else status
            raise
        finally:
            if status and ctx.invoked_subcommand and not ctx.resilient_parsing:
                click.echo(f"{status} | {time.perf_counter() - start:.1f} s | {command}")


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="fluxc")
def main():
    """fluxc: compile FLUX transformers into engines and run them.

    Typical use: fluxc build --model flux1-dev --precision bf16 -o flux1-dev.fluxe
    """


def _register():
    from fluxc.cli import (adapter, bench, build, compare, doctor, evaluate, inspect, passes, refit, run, serve,
                           trust)

    for module in (build, run, serve, adapter, refit, inspect, passes, bench, evaluate, compare, doctor):
        main.add_command(module.command)
    for command in (trust.keygen, trust.sign, trust.verify):
        main.add_command(command)


_register()
