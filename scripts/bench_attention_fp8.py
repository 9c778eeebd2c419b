"""FP8 attention at FLUX.1-dev's attention shape (issue 31): fluxc.attention_fp8 on each of its kernels, cuDNN's FP8
SDPA and FlashAttention-3's FP8 forward (+ the e4m3 cast of its bf16 output, as the op runs it; and without the cast),
against bf16 attention (torch's SDPA, and FA3's bf16 forward), and every cuDNN FP8 execution plan its heuristics offer
(the op runs the first).

    python3 scripts/bench_attention_fp8.py --out bench_attention_fp8.json

Shape: 1024x1024, batch 1: 4608 tokens (4096 image + 512 text), 24 heads of 128, q, k, v and the output [B, H, S, D]
views of FLUX's [B, S, H, D] memory, as the engine passes them. GPU ms per call as a graphed step runs it
(timing.graph_ms); TFLOP/s counts 4 S^2 D H. Accuracy: each output's relative error against float64 attention over
the same inputs (the FP8 rows: the dequantized e4m3 inputs); each cuDNN plan's also against the first plan's. The FA3
rows run where flash_attn_3 is installed (flash_attn_interface). Writes JSON and prints a table last.
"""

import argparse
import importlib.metadata
import json
import time

import torch

from timing import graph_ms, source_commit
from fluxc.numerics import relative_error
from fluxc.runtime.ops.kernels import ATTENTION_OUT_HEADROOM, _CudnnFp8Attention, _bshd_like

try:
    from flash_attn_interface import flash_attn_func
    FLASH3_IMPORT_ERROR = None
except ImportError as e:  # not installed, or installed but failing to load: the JSON and the log say which
    flash_attn_func, FLASH3_IMPORT_ERROR = None, str(e)

B, S, H, D = 1, 4608, 24, 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import cudnn

    g = torch.Generator(device="cuda").manual_seed(0)
    bf16 = [torch.randn(B, S, H, D, device="cuda", generator=g, dtype=torch.bfloat16).permute(0, 2, 1, 3)
            for _ in range(3)]
    scales = [t.abs().amax().float().reshape(1, 1, 1, 1) / 448 for t in bf16]
    e4m3 = [_bshd_like(t).copy_((t / s).to(torch.float8_e4m3fn)) for t, s in zip(bf16, scales)]
    flops = 4 * S * S * D * H * B
    r = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
         "cudnn_frontend": cudnn.__version__, "commit": source_commit(), "shape": [B, S, H, D], "plans": [],
         "flash_attn_3": importlib.metadata.version("flash_attn_3") if flash_attn_func else None,
         "flash_attn_3_import_error": FLASH3_IMPORT_ERROR}
    if FLASH3_IMPORT_ERROR:
        print(f"FlashAttention-3 rows skipped: {FLASH3_IMPORT_ERROR}", flush=True)
    reference = lambda ts: torch.nn.functional.scaled_dot_product_attention(*(t.double() for t in ts))  # noqa: E731
    reference_fp8 = reference([t.float() * sc for t, sc in zip(e4m3, scales)])
    reference_bf16 = reference(bf16)
    op = torch.ops.fluxc.attention_fp8
    o_scale = scales[2] * ATTENTION_OUT_HEADROOM  # the op's output units
    rows = {"bf16 SDPA (torch)": (lambda: torch.nn.functional.scaled_dot_product_attention(*bf16), reference_bf16, 1),
            "fp8 cudnn (fluxc.attention_fp8 'cudnn')": (lambda: op(*e4m3, *scales, D ** -0.5, "cudnn"), reference_fp8,
                                                        o_scale)}
    if flash_attn_func is not None:
        bshd = [t.transpose(1, 2) for t in bf16]
        descales = [sc.reshape(1, 1).expand(B, H) for sc in scales]
        rows |= {"bf16 flash3": (lambda: flash_attn_func(*bshd).transpose(1, 2), reference_bf16, 1),
                 "fp8 flash3 (fluxc.attention_fp8 'flash3': + e4m3 cast)":
                     (lambda: op(*e4m3, *scales, D ** -0.5, "flash3"), reference_fp8, o_scale),
                 "fp8 flash3, bf16 output (no cast)":
                     (lambda: flash_attn_func(*(t.transpose(1, 2) for t in e4m3), q_descale=descales[0],
                                              k_descale=descales[1], v_descale=descales[2]).transpose(1, 2),
                      reference_fp8, 1)}
    r["kernels"] = {}
    for label, (fn, expected, out_scale) in rows.items():
        ms = graph_ms(fn)
        r["kernels"][label] = {"ms": ms, "tflops": flops / ms / 1e9,
                               "relative_error_vs_float64": relative_error(fn().float() * out_scale, expected)}
        print(label, json.dumps(r["kernels"][label]), flush=True)
    del reference_fp8, reference_bf16

    attention = _CudnnFp8Attention(*e4m3, D ** -0.5)
    graph = attention.graph
    start = time.perf_counter()
    graph.build_plans(cudnn.build_plan_policy.ALL)
    r["build_all_plans_s"] = time.perf_counter() - start
    first = None
    for index in range(graph.get_execution_plan_count()):
        plan = {"index": index, "name": graph.get_plan_name_at_index(index)}
        try:
            workspace = torch.empty(graph.get_workspace_size_plan_at_index(index), device="cuda", dtype=torch.uint8)
            out = _bshd_like(e4m3[0])
            pack = attention.pack(*e4m3, *scales[:2], out)

            def call():
                cudnn.set_stream(handle=attention.handle, stream=torch.cuda.current_stream().cuda_stream)
                graph.execute_plan_at_index(pack, workspace, index, handle=attention.handle)
            plan["ms"] = graph_ms(call)
            plan["tflops"] = flops / plan["ms"] / 1e9
            got = out.float() * o_scale
            first = got if first is None else first
            plan["relative_error_vs_first"] = relative_error(got, first)
        except Exception as e:  # a plan that does not build or run here is recorded with its reason
            plan["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        r["plans"].append(plan)
        print(json.dumps(plan), flush=True)
    with open(args.out, "w") as fh:
        json.dump(r, fh, indent=1)
    print(f"\ncuDNN FP8 SDPA plans on {r['gpu']} (cuDNN {r['cudnn']}, frontend {r['cudnn_frontend']}), "
          f"[B, S, H, D] = {r['shape']}; all plans built in {r['build_all_plans_s']:.1f} s")
    for label, k in r["kernels"].items():
        print(f"{label:<56} {k['ms']:8.3f} ms {k['tflops']:6.0f} TF/s  "
              f"err vs float64 {k['relative_error_vs_float64']:.1e}")
    print("cuDNN FP8 plans (fluxc.attention_fp8 'cudnn' runs the first):")
    for p in r["plans"]:
        timing = f"{p['ms']:8.3f} ms {p['tflops']:6.0f} TF/s  err {p['relative_error_vs_first']:.1e}" if "ms" in p \
            else p["error"][:80]
        print(f"{p['index']:>3}  {p['name'][:70]:<70}  {timing}")


if __name__ == "__main__":
    main()
