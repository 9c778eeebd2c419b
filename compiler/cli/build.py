import click

from fluxc.cli.cache_options import cache_options, cache_overrides


@click.command("build")
@click.option("--model", default=None, help="Diffusers folder, BFL .safetensors file, or tiny|flux1-dev|flux1-schnell|flux2-dev|tiny-flux2.")
@click.option("--target", default="auto", show_default=True, help="cpu, sm_90, sm_100, sm_120 or auto (this machine).")
@click.option("--precision", default=None, help="fp32 | bf16 | fp8 | nvfp4 (default: the recipe's, else bf16).")
@click.option("--recipe", default=None, help="Named recipe; it implies its precision (default: the precision's).")
@click.option("--resolution", "resolutions", multiple=True, default=("1024x1024",), show_default=True,
              help="HEIGHTxWIDTH; repeat for several profiles sharing one weight file.")
@click.option("--text-tokens", type=int, default=None, help="Text sequence length (default: the model's, 512 for FLUX.1-dev).")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random weights for named architectures.")
@click.option("--dump-ir", type=click.Path(file_okay=False), default=None, help="Write NN-<pass>-<segment>.txt after each pass.")
@click.option("--transformer-only", is_flag=True, help="Compile only the transformer (prompt embeddings in, latents out).")
@click.option("--encoders", type=click.Choice(["gpu", "offload", "cpu"]), default=None,
              help="Text encoders: resident on the GPU, parked in CPU memory between prompts, or run on the CPU "
                   "(default: gpu; cpu for the CPU target).")
@click.option("--calibrate", type=int, default=0, metavar="N",
              help="fp8, nvfp4: static activation scales (fp8) or global scales (nvfp4; needed by --backend onnx "
                   "and tensorrt) from N calibration prompts, stored in the engine, instead of computing them at run time.")
@click.option("--stage", type=click.Choice(["engine", "plan"]), default="engine", show_default=True,
              help="plan: stop before the target-specific lowering and write a portable plan (any --target), to "
                   "finish on the target with --from.")
@click.option("--from", "from_plan", type=click.Path(), default=None,
              help="Finish this plan (written by --stage plan) into an engine for this machine's GPU (or --target cpu).")
@click.option("--explain", is_flag=True, help="For each pass that rewrote nothing in a segment, print the check "
                                             "that rejected its nearest candidate.")
@click.option("--backend", type=click.Choice(["inductor", "onnx", "tensorrt"]), default="inductor", show_default=True,
              help="inductor: compiled kernels; onnx: one opset-23 ONNX model per segment, run by ONNX Runtime; "
                   "tensorrt: ONNX models built into TensorRT plans, where TensorRT is installed.")
@click.option("--world-size", type=int, default=1, show_default=True, metavar="N",
              help="Split each image's tokens over N GPUs (context parallelism; Ulysses attention over the heads): "
                   "run the engine with fluxc run --gpus N.")
@click.option("--sign-key", type=click.Path(dir_okay=False), default=None,
              help="Sign the engine with this Ed25519 private key (PEM; fluxc keygen makes one).")
@click.option("--tasks", default="t2i", show_default=True,
              help="What the engine does: t2i, and img2img / inpaint (both add the VAE encoder: fluxc run --image "
                   "[--mask]; FLUX.1), e.g. t2i,img2img,inpaint; or alone: fill (FLUX.1 Fill), kontext (FLUX.1 "
                   "Kontext), references (FLUX.2 reference images, --references N).")
@click.option("--references", type=int, default=1, show_default=True,
              help="With --tasks references: how many reference images an edit takes (each of the output's size).")
@cache_options
@click.option("-o", "--output", required=True, type=click.Path(), help="Engine directory to write (*.fluxe).")
def command(model, target, precision, recipe, resolutions, text_tokens, batch, seed, dump_ir, transformer_only,
            encoders, calibrate, stage, from_plan, explain, backend, world_size, sign_key, tasks, references, output,
            **cache):
    """Compile a FLUX pipeline (text encoders, transformer, VAE decoder) into an engine.

    Typical use: fluxc build --model flux1-dev --precision bf16 --resolution 1024x1024 -o dev.fluxe

    For a GPU you do not have here: fluxc build --model flux1-dev --target sm_100 --precision nvfp4 --stage plan
    -o dev.fluxp, then on the B200: fluxc build --from dev.fluxp -o dev.fluxe
    """
    from fluxc.build import BuildOptions, build
    from fluxc.validate import parse_resolution
    from fluxc.runtime.core.errors import FluxcError

    if (model is None) == (from_plan is None):
        raise FluxcError("Give exactly one of --model (compile a model) and --from (finish a plan).",
                         "fluxc build --model flux1-dev ... or fluxc build --from PLAN ...")

    opts = BuildOptions(model=model, output=output, target=target, precision=precision, recipe=recipe,
                        resolutions=tuple(parse_resolution(r) for r in resolutions), text_tokens=text_tokens,
                        batch=batch, seed=seed, dump_ir=dump_ir,
                        transformer_only=transformer_only, encoders=encoders, calibrate=calibrate, stage=stage,
                        from_plan=from_plan, backend=backend, world_size=world_size, cache=cache_overrides(**cache),
                        sign_key=sign_key, tasks=tuple(t.strip() for t in tasks.split(",")), references=references)

    from fluxc.cli.progress import stage_reporter

    manifest = build(opts, stage_reporter("build"))
    if stage == "plan":
        click.echo(f"wrote plan {output}: {manifest['precision']} for {manifest['target']}, "
                   f"{len(manifest['segments'])} segments; finish it with fluxc build --from {output} -o ENGINE")
        return
    if explain:
        for segment, passes in manifest["pass_explain"].items():
            for name, why in passes.items():
                click.echo(f"  {segment:<16} {name:<20} matched nothing: {why}")
    worst = max(v["max_relative_error"] for v in manifest["numerics"].values())
    mode = " (emulated)" if manifest["precision_mode"] == "emulated" else ""
    click.echo(f"wrote {output}: {manifest['precision']}{mode} for {manifest['target']['sm']}, "
               f"{len(manifest['segments'])} segments, max segment relative error {worst:.2e}")
