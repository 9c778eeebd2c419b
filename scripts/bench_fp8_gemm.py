"""FP8 GEMMs with their epilogues (runtime/ops/fp8_gemm.py, issue 31) against cuBLAS `_scaled_mm` plus today's
separate kernels, at every FLUX.1-dev GEMM shape (1024x1024: 4096 image and 512 text tokens; single blocks 4608).

    python3 scripts/bench_fp8_gemm.py --out bench_fp8_gemm.json     (gpu_tests.sh job fp8gemm)

Per shape and epilogue, GPU time per call as an engine's graphed step runs it (timing.graph_ms: one CUDA graph of
10 back-to-back calls, replayed; until 2026-12-06 one eagerly launched call per timing, which counted host dispatch):
    today   `_scaled_mm` (rowwise scales, bias, bf16 out) then the epilogue's own kernels: fluxc.gelu_fp8 (GELU and
            per-token e4m3), or addcmul (residual + gate * y, one kernel, as Inductor fuses it)
    cublas  `_scaled_mm` alone (the GEMM without its epilogue), with fast accumulation (use_fast_accum: the sums
            left in the tensor cores' accumulator, as the Triton kernel leaves them; its relative error against the
            default), and with 1x128 / 128x128 block scales where torch takes them (what a down-projection reading
            block-scaled activations would call)
    fluxc   the Triton kernel with the epilogue inside, at each tile config (--tiles) and way of loading and storing
            tiles (--ways: pointers, or TMA descriptors with a persistent grid, its loop over tiles flattened or
            not, its output stored through descriptors or not); the best is reported, and the best of each way
    chosen  what the op launches for the shape (fp8_gemm.choose's tiles, or cuBLAS below CUBLAS_BELOW rows)
    tactic  for a GEMM without an epilogue: what fluxc.tactics measures for a build on this GPU, and its pick
TFLOP/s counts 2MNK; GB moved counts each variant's own reads and writes. Each fused output is checked against
the reference ops on the same inputs (relative error). Writes JSON and prints a table last.
"""

import argparse
import json

import torch

from timing import graph_ms, source_commit
from fluxc import tactics
from fluxc.runtime.ops import fp8_gemm as f
from fluxc.runtime.ops.kernels import quantize_rows
from fluxc.numerics import relative_error

IMAGE, TEXT, HIDDEN, MLP = 4096, 512, 3072, 12288
# (name, M, N, K, epilogue, activation scales in 1x128 blocks): the GEMMs of a FLUX.1-dev step at 1024x1024, image
# and text streams of the double blocks apart, the single blocks' fused QKV + MLP up-projection and their output
# projection over [attention, MLP]; the MLP down-projections both ways: reading the fused GELU's blocks, and
# per-token scales (GELU unfused: sm90_fp8_epilogues' default); and the GEMMs that default leaves without an
# epilogue (the "plain" choice puts them on the Triton kernel): the MLP up-projections, the single blocks' QKV and
# MLP up-projection apart (fuse_qkv's default)
SHAPES = [("double img qkv", IMAGE, 3 * HIDDEN, HIDDEN, f.EPILOGUE_BF16, False),
          ("double img attn out", IMAGE, HIDDEN, HIDDEN, f.EPILOGUE_GATE_RESIDUAL, False),
          ("double img mlp up", IMAGE, MLP, HIDDEN, f.EPILOGUE_GELU_FP8, False),
          ("double img mlp down", IMAGE, HIDDEN, MLP, f.EPILOGUE_GATE_RESIDUAL, True),
          ("double txt qkv", TEXT, 3 * HIDDEN, HIDDEN, f.EPILOGUE_BF16, False),
          ("double txt attn out", TEXT, HIDDEN, HIDDEN, f.EPILOGUE_GATE_RESIDUAL, False),
          ("double txt mlp up", TEXT, MLP, HIDDEN, f.EPILOGUE_GELU_FP8, False),
          ("double txt mlp down", TEXT, HIDDEN, MLP, f.EPILOGUE_GATE_RESIDUAL, True),
          ("single qkv + mlp up", IMAGE + TEXT, 3 * HIDDEN + MLP, HIDDEN, f.EPILOGUE_BF16, False),
          ("single out attn half", IMAGE + TEXT, HIDDEN, HIDDEN, f.EPILOGUE_GATE_RESIDUAL, False),
          ("double img mlp down", IMAGE, HIDDEN, MLP, f.EPILOGUE_GATE_RESIDUAL, False),
          ("double txt mlp down", TEXT, HIDDEN, MLP, f.EPILOGUE_GATE_RESIDUAL, False),
          ("double img mlp up", IMAGE, MLP, HIDDEN, f.EPILOGUE_BF16, False),
          ("double txt mlp up", TEXT, MLP, HIDDEN, f.EPILOGUE_BF16, False),
          ("single qkv", IMAGE + TEXT, 3 * HIDDEN, HIDDEN, f.EPILOGUE_BF16, False),
          ("single mlp up", IMAGE + TEXT, MLP, HIDDEN, f.EPILOGUE_BF16, False),
          ("single out mlp half", IMAGE + TEXT, HIDDEN, MLP, f.EPILOGUE_GATE_RESIDUAL, False)]
# 4 warps and 64-row tiles, also swept on an H100 (2026-12-06), were never the fastest and at times 4x slower
# block_m x block_n x stages; 8 warps, or 4 a consumer warp group where warp specialized
TILES = ("128x128x3", "128x128x4", "128x256x3", "128x256x4", "256x128x3")
# a way to load and store: Config.loads, then its flags
FLAGS = ("flatten", "warp_specialize", "tma_store")
WAYS = ("pointers", "tma", "tma+flatten", "tma+tma_store", "tma+flatten+tma_store", "tma+warp_specialize",
        "tma+warp_specialize+tma_store")


def config_of(tile: str, way: str) -> f.Config:
    (block_m, block_n, stages), (loads, *flags) = map(int, tile.split("x")), way.split("+")
    return f.Config(block_m, block_n, 4 if "warp_specialize" in flags else 8, stages, loads,
                    **{flag: True for flag in flags})


def way_of(config: f.Config) -> str:
    return "+".join([config.loads] + [flag for flag in FLAGS if getattr(config, flag)])


NAMES = {f.EPILOGUE_BF16: "bf16", f.EPILOGUE_GELU_FP8: "gelu_fp8", f.EPILOGUE_GATE_RESIDUAL: "gate_residual"}


def operands(m, n, k, blocks: bool, device="cuda"):
    g = torch.Generator(device=device).manual_seed(m + n + k)
    x = torch.randn(m, k, device=device, generator=g, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, generator=g, dtype=torch.bfloat16) / k ** 0.5
    a, a_scale = f.quantize_blocks(x) if blocks else quantize_rows(x)
    wq, w_scale = quantize_rows(w)
    bias = torch.randn(n, device=device, generator=g, dtype=torch.bfloat16) * 0.1
    gate = torch.randn(1, n, device=device, generator=g, dtype=torch.bfloat16)
    residual = torch.randn(1, m, n, device=device, generator=g, dtype=torch.bfloat16)
    return a, a_scale, wq, w_scale, bias, gate, residual


def scaled_mm(a, a_scale, w, w_scale, bias, fast_accum=False):
    """cuBLAS's rowwise-scaled FP8 GEMM; fast_accum: e4m3 products summed in the tensor cores' own accumulator
    across K, as fluxc's Triton kernel sums them (Triton's default on sm_90), not promoted to fp32 at intervals."""
    return torch._scaled_mm(a, w.T, a_scale, w_scale.T, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=fast_accum)


def block_scaled_mm(a, a_scale, w, w_scale_blocks):
    """cuBLAS's Hopper block scaling: 1x128 activation and 128x128 weight blocks (the timing only: w's values are
    per-channel quantized)."""
    return torch._scaled_mm(a, w.T, a_scale, w_scale_blocks.T, out_dtype=torch.bfloat16)


def outer_dim_major(scale: torch.Tensor) -> torch.Tensor:
    """The same [M, K / 128] scales with stride (1, M): the layout cuBLAS's block scaling reads."""
    return scale.t().contiguous().t()


def measure(name, m, n, k, epilogue, blocks, configs) -> dict:
    a, a_scale, w, w_scale, bias, gate, residual = operands(m, n, k, blocks)
    flops = 2 * m * n * k
    row = {"shape": name, "m": m, "n": n, "k": k, "epilogue": NAMES[epilogue], "a_scales": "1x128" if blocks else "row"}
    gemm_bytes = m * k + n * k + 4 * (m + n)
    if blocks:  # today's down-projection reads per-token scales: time cuBLAS on the same values quantized so
        a_row, a_row_scale = quantize_rows(f.dequantize_activation(a, a_scale).bfloat16())
    else:
        a_row, a_row_scale = a, a_scale
    y = scaled_mm(a_row, a_row_scale, w, w_scale, bias)
    row["cublas_ms"] = graph_ms(lambda: scaled_mm(a_row, a_row_scale, w, w_scale, bias))
    row["cublas_fast_accum_ms"] = graph_ms(lambda: scaled_mm(a_row, a_row_scale, w, w_scale, bias, True))
    row["cublas_fast_accum_relative_error"] = relative_error(scaled_mm(a_row, a_row_scale, w, w_scale, bias, True), y)
    if epilogue == f.EPILOGUE_GELU_FP8:
        row["today_ms"] = graph_ms(lambda: torch.ops.fluxc.gelu_fp8(scaled_mm(a_row, a_row_scale, w, w_scale, bias)))
        today_bytes = gemm_bytes + 2 * m * n * 2 + m * n + 4 * m  # y written and read in bf16, e4m3 + scales written
        fused_bytes = gemm_bytes + m * n + 4 * m * n // 128
    elif epilogue == f.EPILOGUE_GATE_RESIDUAL:
        row["today_ms"] = graph_ms(lambda: torch.addcmul(residual, gate[:, None], scaled_mm(
            a_row, a_row_scale, w, w_scale, bias).view(1, m, n)))
        today_bytes = gemm_bytes + 2 * m * n * 2 + 2 * m * n * 2  # y written and read; residual read, out written
        fused_bytes = gemm_bytes + 2 * m * n * 2
        if blocks:
            w_blocks = w_scale.view(n // 128, 128).amax(-1, keepdim=True).expand(n // 128, k // 128).contiguous()
            try:
                a_scale_cm = outer_dim_major(a_scale)
                row["cublas_block_scaled_ms"] = graph_ms(lambda: block_scaled_mm(a, a_scale_cm, w, w_blocks))
            except (RuntimeError, ValueError) as e:  # the scale layouts torch wants are a guess here: record its answer
                row["cublas_block_scaled_error"] = str(e)[:300]
    else:
        row["today_ms"] = row["cublas_ms"]
        today_bytes = fused_bytes = gemm_bytes + m * n * 2
    # what the op launches for this shape (fp8_gemm.choose's tiles) is timed even where the sweep leaves it out
    chosen = f.choose(f.CONFIGS[(epilogue, blocks)], m, n, f.multiprocessors(a.device))
    sweep = list(dict.fromkeys([*configs, chosen]))
    best = None
    for config in sweep:
        if epilogue == f.EPILOGUE_GELU_FP8 and (config.block_n != 128 or config.tma_store):
            continue
        out = torch.empty(m, n, device="cuda", dtype=torch.float8_e4m3fn if epilogue == f.EPILOGUE_GELU_FP8
                          else torch.bfloat16)
        out_scale = torch.empty(m, n // 128, device="cuda") if epilogue == f.EPILOGUE_GELU_FP8 else None
        extra = dict(gate=gate, residual=residual) if epilogue == f.EPILOGUE_GATE_RESIDUAL else {}
        if epilogue == f.EPILOGUE_GATE_RESIDUAL:
            out = out.view(1, m, n)

        def call():
            f.launch(a, a_scale, w, w_scale, bias, out, epilogue, out_scale=out_scale, config=config,
                     traceable=False, **extra)
        try:
            ms = graph_ms(call)
        except Exception as e:  # a config that does not fit (shared memory, registers) is skipped, and said
            row.setdefault("configs_failed", {})[str(config)] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        row.setdefault("configs_ms", {})[str(config)] = ms
        if best is None or ms < best[0]:
            best = (ms, config, out.clone(), None if out_scale is None else out_scale.clone())
    by_way = {}
    for config in sweep:
        if str(config) in row.get("configs_ms", {}):
            by_way[way_of(config)] = min(by_way.get(way_of(config), float("inf")), row["configs_ms"][str(config)])
    row["fluxc_by_way_ms"] = by_way
    for loads in ("pointers", "tma"):
        timed = [ms for way, ms in by_way.items() if way.startswith(loads)]
        row[f"fluxc_{loads}_ms"] = min(timed) if timed else None
    row["fluxc_ms"], row["fluxc_config"] = best[0], best[1]._asdict()
    # what the op launches: the chosen tiles, or cuBLAS for a few rows without an epilogue
    row["chosen_config"] = chosen._asdict()
    row["chosen_ms"] = (row["cublas_ms"] if epilogue == f.EPILOGUE_BF16 and f.on_cublas(a, a_scale)
                        else row["configs_ms"].get(str(chosen)))
    if epilogue == f.EPILOGUE_BF16 and not blocks and not f.on_cublas(a, a_scale):
        # what a build on this GPU measures to pick the plain GEMM's kernel (passes/fuse_fp8_epilogues.py)
        row["tactic_ms"] = tactics.fp8_linear_ms(m, n, k, True, a.device)
        row["tactic"] = min(row["tactic_ms"], key=row["tactic_ms"].get)
    # the check: against the reference ops on the same inputs (on the GPU, fp32 matmul)
    if epilogue == f.EPILOGUE_GELU_FP8:
        want_q, want_scale = f.gelu_fp8_reference(a, a_scale, w, w_scale, bias)
        row["relative_error"] = relative_error(f.dequantize_activation(best[2], best[3]),
                                               f.dequantize_activation(want_q, want_scale))
    elif epilogue == f.EPILOGUE_GATE_RESIDUAL:
        row["relative_error"] = relative_error(best[2], f.gate_residual_reference(a, a_scale, w, w_scale, bias, gate,
                                                                                  residual))
    else:
        row["relative_error"] = relative_error(best[2], y)
    for key, nbytes in (("today", today_bytes), ("fluxc", fused_bytes)):
        row[f"{key}_gb"] = nbytes / 1e9
        row[f"{key}_tflops"] = flops / row[f"{key}_ms"] / 1e9
    row["cublas_tflops"] = flops / row["cublas_ms"] / 1e9
    row["speedup_vs_today"] = row["today_ms"] / row["fluxc_ms"]
    return row


def measure_joined(configs) -> dict:
    """A single block's output projection (fp8_epilogues "joined"): its attention half (e4m3 on one scale, K 3072)
    leading its MLP half (per token, K 12288) in one K loop and one gated-residual epilogue, against the two
    chained gated-residual kernels the engine runs without it (each at its chosen tiles) and cuBLAS's two
    `_scaled_mm` alone. Non-flattened TMA configs only (the kernel's one loop over both K ranges)."""
    m, n, k0, k = IMAGE + TEXT, HIDDEN, HIDDEN, MLP
    a, a_scale, w, w_scale, bias, gate, residual = operands(m, n, k, False)
    a0, _, w0, w0_scale, _, _, _ = operands(m, n, k0, False)
    x0 = a0.float()  # requantized on one scale, as the FP8 attention output is
    a0_scale = x0.abs().amax().reshape(1, 1) / 448
    a0 = (x0 / a0_scale).to(a0.dtype)
    row = {"shape": "single out joined", "m": m, "n": n, "k": k0 + k, "epilogue": "gate_residual", "a_scales": "row"}
    flops, out = 2 * m * n * (k0 + k), torch.empty_like(residual)
    row["cublas_ms"] = graph_ms(lambda: (scaled_mm(a0, a0_scale.expand(m, 1).contiguous(), w0, w0_scale, None),
                                         scaled_mm(a, a_scale, w, w_scale, bias)))
    half = torch.empty_like(residual)
    row["today_ms"] = graph_ms(lambda: (
        f.launch(a0, a0_scale, w0, w0_scale, None, half, f.EPILOGUE_GATE_RESIDUAL, gate=gate, residual=residual,
                 traceable=False),
        f.launch(a, a_scale, w, w_scale, bias, out, f.EPILOGUE_GATE_RESIDUAL, gate=gate, residual=half,
                 traceable=False)))
    chosen = f.JOINED_CONFIG
    lead, best = (a0, a0_scale, w0, w0_scale), None
    for config in dict.fromkeys([c._replace(flatten=False) for c in configs
                                 if c.loads == "tma" and not c.warp_specialize and not c.tma_store] + [chosen]):
        try:
            ms = graph_ms(lambda: f.launch(a, a_scale, w, w_scale, bias, out, f.EPILOGUE_GATE_RESIDUAL, gate=gate,
                                           residual=residual, lead=lead, config=config, traceable=False))
        except Exception as e:  # as measure()'s sweep
            row.setdefault("configs_failed", {})[str(config)] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        row.setdefault("configs_ms", {})[str(config)] = ms
        if best is None or ms < best[0]:
            best = (ms, config, out.clone())
    row["fluxc_by_way_ms"] = {"tma": best[0]}
    row["fluxc_ms"], row["fluxc_config"], row["chosen_config"] = best[0], best[1]._asdict(), chosen._asdict()
    row["chosen_ms"] = row["configs_ms"][str(chosen)]
    row["relative_error"] = relative_error(best[2], f.gate_residual_reference(a, a_scale, w, w_scale, bias, gate,
                                                                              residual, lead))
    gemm_bytes = m * (k0 + k) + n * (k0 + k) + 4 * (m + 2 * n)
    for key, nbytes in (("today", gemm_bytes + 6 * m * n * 2), ("fluxc", gemm_bytes + 2 * m * n * 2)):
        row[f"{key}_gb"] = nbytes / 1e9  # today: residual read, the half written and read, out written (bf16)
        row[f"{key}_tflops"] = flops / row[f"{key}_ms"] / 1e9
    row["cublas_tflops"] = flops / row["cublas_ms"] / 1e9
    row["speedup_vs_today"] = row["today_ms"] / row["fluxc_ms"]
    return row


def abbreviated(way: str) -> str:
    return way.replace("tma_store", "st").replace("flatten", "fl").replace("warp_specialize", "ws")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES, or 'joined' (a single "
                                                   "block's output projection in one K loop); default: all")
    ap.add_argument("--tiles", default=",".join(TILES), help=f"comma-separated, of {TILES}")
    ap.add_argument("--ways", default="pointers,tma", help=f"comma-separated, of {WAYS}")
    args = ap.parse_args()
    shapes = [*SHAPES, "joined"] if args.shapes is None else [
        "joined" if i == "joined" else SHAPES[int(i)] for i in args.shapes.split(",")]
    configs = [config_of(tile, way) for way in args.ways.split(",") for tile in args.tiles.split(",")]
    r = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": source_commit(),
         "triton": __import__("triton").__version__, "rows": []}
    for shape in shapes:
        r["rows"].append(measure_joined(configs) if shape == "joined" else measure(*shape, configs))
        print(json.dumps(r["rows"][-1]), flush=True)
        with open(args.out, "w") as fh:  # after each shape: a run cut short keeps what it measured
            json.dump(r, fh, indent=1)
    print(f"\nFP8 GEMMs with epilogues on {r['gpu']} (commit {r['commit']}); ms, TFLOP/s")
    ways = [way for way in WAYS if way in args.ways.split(",")]
    print(f"{'shape':<22}{'epilogue':<15}{'scales':<7}{'cuBLAS':>8}{'fast':>7}{'today':>8}"
          + "".join(f"{abbreviated(w):>12}" for w in ways)
          + f"{'chosen':>8}{'TF/s':>7}{'x today':>9}{'rel err':>9}  tactic")
    for x in r["rows"]:
        best = "".join(f"{x['fluxc_by_way_ms'].get(way, float('nan')):>12.3f}" for way in ways)
        print(f"{x['shape']:<22}{x['epilogue']:<15}{x['a_scales']:<7}{x['cublas_ms']:>8.3f}"
              f"{x.get('cublas_fast_accum_ms', float('nan')):>7.3f}{x['today_ms']:>8.3f}{best}"
              f"{x['chosen_ms'] or float('nan'):>8.3f}{x['fluxc_tflops']:>7.0f}{x['speedup_vs_today']:>9.2f}"
              f"{x['relative_error']:>9.1e}  {x.get('tactic', '')}")


if __name__ == "__main__":
    main()
