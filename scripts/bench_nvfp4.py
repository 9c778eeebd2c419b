"""NVFP4 on FLUX.1-dev (seeded random weights) on the lab GPU: the emulated engine, and a plan for sm_100.

1. Per-layer SQNR: each linear of double block 0 and single block 0 (FLUX.1-dev shapes and random weights),
   quantized and lowered alone as the build does, against float64 math on random [4608, K] activations.
2. Transformer-only engines at 1024x1024, bf16 and nvfp4 (emulated on sm_90): weights file sizes, build
   times, the build checks' per-segment errors; 28-step latents of the nvfp4 engine against the bf16 engine's
   from the same noise (SQNR) and the time per step of each (emulation is a numerics mode, not a speed mode).
3. `--target sm_100 --precision nvfp4 --stage plan`: time, size and sha256 of each file.
Writes JSON to --out and prints a short table last.
"""

import argparse
import json
import os
import time

import torch

from timing import H, TEXT, W, source_commit
from fluxc.build import BuildOptions, build
from fluxc.frontend.models import load_model
from fluxc.numerics import NVFP4_LINEAR_SQNR_DB, sqnr_db
from fluxc.passes import lower_nvfp4, quantize_nvfp4
from fluxc.passes.base import PassContext
from fluxc.plan import verify_plan
from fluxc.recipes import RECIPES
from fluxc.runtime import Engine
from fluxc.weights import call_graph, one_linear_graph


def per_layer_sqnr(model, target: str) -> dict[str, float]:
    recipe = RECIPES["sm100_nvfp4"]()
    blocks = {"double": model.transformer_blocks[0], "single": model.single_transformer_blocks[0]}
    g = torch.Generator("cuda").manual_seed(0)
    out = {}
    for kind, block in blocks.items():
        for name, linear in block.named_modules():
            if not isinstance(linear, torch.nn.Linear) or "norm" in name:  # modulation: weight-only, hoisted
                continue
            w, b = linear.weight.detach(), linear.bias.detach()
            x = torch.randn(H // 16 * W // 16 + TEXT, w.shape[1], device="cuda", generator=g).to(torch.bfloat16)
            ctx = PassContext(recipe, target, kind)
            gm = lower_nvfp4.run(quantize_nvfp4.run(one_linear_graph(w, b, x.shape[0], name), ctx).graph, ctx).graph
            (got,) = call_graph(gm, {f"{name}.weight": w, f"{name}.bias": b, "x_1": x})
            out[f"{kind}:{name}"] = round(sqnr_db(got, x.double() @ w.double().t() + b.double()), 2)
    return out


def latents_and_ms(path: str, steps: int) -> tuple[torch.Tensor, float]:
    engine = Engine.load(path)
    g = torch.Generator().manual_seed(7)
    pe = torch.randn(1, TEXT, 4096, generator=g).to("cuda", torch.bfloat16)
    pooled = torch.randn(1, 768, generator=g).to("cuda", torch.bfloat16)
    engine.denoise(pe, pooled, height=H, width=W, steps=2, seed=0)  # warm-up: CUDA graph capture
    torch.cuda.synchronize()
    start = time.perf_counter()
    latents = engine.denoise(pe, pooled, height=H, width=W, steps=steps, seed=0)
    torch.cuda.synchronize()
    return latents, (time.perf_counter() - start) / steps * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default="/tmp/fluxc-nvfp4")
    ap.add_argument("--steps", type=int, default=28)
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    results = {"commit": source_commit(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "model": "flux1-dev (seeded random weights, seed 0)", "resolution": f"{H}x{W}", "text_tokens": TEXT}

    model = load_model("flux1-dev", dtype=torch.bfloat16, device=torch.device("cuda"), seed=0).module
    results["per_layer_sqnr_db"] = per_layer_sqnr(model, "sm_90")
    results["per_layer_floor_db"] = NVFP4_LINEAR_SQNR_DB
    del model
    torch.cuda.empty_cache()

    common = dict(model="flux1-dev", resolutions=((H, W),), text_tokens=TEXT, transformer_only=True)
    engines = {}
    for precision in ("bf16", "nvfp4"):
        path = os.path.join(args.workdir, f"flux1-dev-{precision}.fluxe")
        start = time.perf_counter()
        manifest = build(BuildOptions(output=path, precision=precision, **common))
        engines[precision] = path
        results[f"fluxc {precision}"] = {
            "build_s": round(time.perf_counter() - start, 1), "build_seconds": manifest["build_seconds"],
            "precision_mode": manifest["precision_mode"], "recipe": manifest["recipe"]["name"],
            "weights_gb": round(os.path.getsize(os.path.join(path, "weights.safetensors")) / 1e9, 3),
            "segment_check": {k: v["max_relative_error"] for k, v in manifest["numerics"].items()},
            "pass_counts": {k: v.get("quantize_nvfp4") for k, v in manifest["pass_counts"].items()}}
    want, results["fluxc bf16"]["ms_per_step"] = latents_and_ms(engines["bf16"], args.steps)
    got, results["fluxc nvfp4"]["ms_per_step"] = latents_and_ms(engines["nvfp4"], args.steps)
    results["fluxc nvfp4"]["latent_sqnr_db_vs_bf16"] = round(sqnr_db(got, want), 2)

    plan = os.path.join(args.workdir, "flux1-dev-sm100-nvfp4.fluxp")
    start = time.perf_counter()
    build(BuildOptions(output=plan, target="sm_100", precision="nvfp4", stage="plan", **common))
    header = verify_plan(plan)
    results["sm_100 plan"] = {
        "seconds": round(time.perf_counter() - start, 1), "build_seconds": header["build_seconds"],
        "bytes": {rel: os.path.getsize(os.path.join(plan, rel)) for rel in [*header["files"], "plan.json"]},
        "sha256": header["files"], "target": header["target"],
        "nvfp4_linear_per_double_block": sum(n.get("target") == "fluxc.nvfp4_linear.default" for n in next(
            s for s in header["segments"] if s["kind"] == "double")["graph"]["nodes"])}

    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    layers = results["per_layer_sqnr_db"].values()
    print(f"\nper-layer SQNR vs float64: {min(layers):.1f} .. {max(layers):.1f} dB (floor {NVFP4_LINEAR_SQNR_DB})")
    print(f"{'engine':<14}{'mode':>10}{'weights GB':>12}{'build s':>9}{'ms/step':>9}{'SQNR dB':>9}")
    for name in ("fluxc bf16", "fluxc nvfp4"):
        r = results[name]
        print(f"{name:<14}{r['precision_mode']:>10}{r['weights_gb']:>12.2f}{r['build_s']:>9.0f}{r['ms_per_step']:>9.1f}"
              f"{r.get('latent_sqnr_db_vs_bf16', float('nan')):>9.1f}")
    p = results["sm_100 plan"]
    print(f"sm_100 plan: {p['seconds']:.0f} s, {sum(p['bytes'].values()) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
