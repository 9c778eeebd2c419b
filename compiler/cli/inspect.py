import json

import click


@click.command("inspect")
@click.argument("engine", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.")
@click.option("--verify", is_flag=True, help="Also check every file against its digest (reads every byte; fluxc verify also checks signatures).")
def command(engine, as_json, verify):
    """Print an engine's manifest readably.

    Typical use: fluxc inspect flux1-dev.fluxe
    """
    from fluxc.runtime.core.bundle import read_manifest, verify_files

    m = read_manifest(engine)
    if verify:
        verify_files(engine, m)  # a FluxcError names the first missing, unlisted or changed file
    if as_json:
        click.echo(json.dumps(m, indent=1))
        return
    cfg = m["model"]["config"]
    click.echo(f"engine       {engine}  (format {m['format_version']}, fluxc {m['fluxc_version']})")
    click.echo(f"model        {m['model']['family']} from {m['model']['source']}  "
               f"{cfg['num_layers']} double + {cfg['num_single_layers']} single blocks")
    mode = " (emulated)" if m["precision_mode"] == "emulated" else ""
    click.echo(f"target       {m['target']['sm']} ({m['target']['device']})   precision {m['precision']}{mode}   "
               f"recipe {m['recipe']['name']}")
    b = m["backend"]
    click.echo(f"backend      {b['name']}  torch {b['torch']}  triton {b['triton']}  cuda {b['cuda']}  cudnn {b['cudnn']}")
    click.echo("profiles     " + ", ".join(_profile(p) for p in m["profiles"]))
    click.echo("passes       " + " -> ".join(m["passes"]))
    click.echo("segments")
    for s in m["segments"]:
        check = m["numerics"].get(s["name"])  # a schedule segment is checked with the segments it feeds
        unchecked = "TeaCache probe, per step" if s["kind"].endswith("_probe") else "once per generation, all steps"
        err = f"rel.err {check['max_relative_error']:.1e}" if check else unchecked
        click.echo(f"  {s['name']:<24} x{len(s['layers']):<3} {len(s['weights'])} weights  "
                   f"in {[i['name'] for i in s['inputs']]}  {err}")
    cache = m["cache"]
    if "cut" in cache:
        config = cache["config"]
        policy = config["policy"] + (f" threshold {config['threshold']}" if config["threshold"] is not None else "")
        click.echo(f"cache        default {policy}; cut after {cache['cut']['after_layer']}; probes: residual"
                   + (", modulated input" if cache["probes"]["modulated"] else f" (no TeaCache: {cache['why_no_probe']})"))
    click.echo("build time   " + ", ".join(f"{k} {v:.1f}s" for k, v in m["build_seconds"].items()))
    click.echo(f"cache key    {m['cache_key'][:16]}")
    click.echo(f"files        {len(m['files'])} files, " + ("every digest verified" if verify else
               "not verified: inspect reads the manifest only (--verify checks every file; Engine.load always does)"))


def _profile(p: dict) -> str:
    ranks = f", split over {p['world_size']} ranks" if p["world_size"] > 1 else ""
    return f"{p['name']} (batch {p['batch']}, {p['image_tokens']}+{p['text_tokens']} tokens{ranks})"
