import click

from fluxc.cli.cache_options import cache_options, cache_overrides


@click.command("bench")
@click.argument("engine", type=click.Path())
@click.option("--resolution", default=None, help="HxW of one of the engine's profiles (default: its first).")
@click.option("--steps", type=int, default=28, show_default=True)
@click.option("--batch", type=int, default=1, show_default=True, help="Prompts per generation.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed generations first.")
@click.option("--repeat", type=int, default=3, show_default=True, help="Timed generations.")
@click.option("--name", default=None, help="The record's name in fluxc compare (default: the engine folder's name).")
@cache_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="JSON record to write.")
def command(engine, resolution, steps, batch, warmup, repeat, name, output, **cache):
    """Time an engine: ms per step (median, p10, p90), seconds per stage, peak memory, load time -> JSON.

    Typical use: fluxc bench dev.fluxe --steps 28 --repeat 5 -o h200-bf16.json
    """
    import time

    from fluxc.validate import parse_resolution
    from fluxc.cli.progress import progress_bar
    from fluxc.cli.records_io import write_record
    from fluxc.records import bench
    from fluxc.runtime import Engine
    from fluxc.runtime.core.bundle import check_writable
    from fluxc.runtime.core.errors import FluxcError

    if steps < 1 or warmup < 0 or repeat < 1 or batch < 1:
        raise FluxcError("--steps, --repeat and --batch must be at least 1 and --warmup at least 0.",
                         "e.g. --steps 28 --warmup 1 --repeat 3.")
    check_writable(output)
    height, width = parse_resolution(resolution) if resolution else (None, None)
    start = time.perf_counter()
    eng = Engine.load(engine)
    load_s = time.perf_counter() - start
    with progress_bar(warmup + repeat, "generations") as advance:
        record = bench(eng, height=height, width=width, steps=steps, batch=batch, warmup=warmup, repeat=repeat,
                       name=name, load_s=load_s, cache_config=eng.cache_config(**cache_overrides(**cache)),
                       on_generation=advance)
    write_record(output, record)
    ms = record["speed"]["ms_per_step"]
    click.echo(f"wrote {output}: {record['name']} on {record['machine']['gpu'] or 'cpu'}, {ms['median']:.2f} ms/step "
               f"(p10 {ms['p10']:.2f}, p90 {ms['p90']:.2f}) at {record['settings']['resolution']}, {steps} steps")
