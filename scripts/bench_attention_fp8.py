"""cuDNN's FP8 SDPA at FLUX.1-dev's attention shape, every execution plan its heuristics offer (issue 31: which is
fastest, and how far from the heuristics' first choice, which fluxc.attention_fp8 runs), against bf16 SDPA.

    python3 scripts/bench_attention_fp8.py --out bench_attention_fp8.json

Shape: 1024x1024, batch 1: 4608 tokens (4096 image + 512 text), 24 heads of 128, q, k, v and the output [B, H, S, D]
views of FLUX's [B, S, H, D] memory, as the engine passes them. GPU ms per call as a graphed step runs it
(timing.graph_ms); TFLOP/s counts 4 S^2 D H. Each plan's output is checked against the first plan's (relative
error of the dequantized output). Writes JSON and prints a table last.
"""

import argparse
import json
import time

import torch

from timing import graph_ms, source_commit
from fluxc.numerics import relative_error
from fluxc.runtime.ops.kernels import _CudnnFp8Attention, _bshd_like

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
         "cudnn_frontend": cudnn.__version__, "commit": source_commit(), "shape": [B, S, H, D], "plans": []}
    r["bf16_sdpa_ms"] = graph_ms(lambda: torch.nn.functional.scaled_dot_product_attention(*bf16))

    attention = _CudnnFp8Attention(*e4m3, D ** -0.5)
    r["heuristics_first_ms"] = graph_ms(lambda: attention(*e4m3, *scales[:2]))  # v's scale: not cuDNN's (pack)
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
            got = out.float() * scales[2]
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
    print(f"bf16 SDPA {r['bf16_sdpa_ms']:.3f} ms; fluxc.attention_fp8 (heuristics' first) "
          f"{r['heuristics_first_ms']:.3f} ms")
    for p in r["plans"]:
        timing = f"{p['ms']:8.3f} ms {p['tflops']:6.0f} TF/s  err {p['relative_error_vs_first']:.1e}" if "ms" in p \
            else p["error"][:80]
        print(f"{p['index']:>3}  {p['name'][:70]:<70}  {timing}")


if __name__ == "__main__":
    main()
