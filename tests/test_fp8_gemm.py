"""FP8 GEMMs with their epilogues (runtime/ops/fp8_gemm.py, issue 31): the reference ops against float64 math and
against today's unfused path, and the Triton kernel itself run by Triton's interpreter on the CPU against them."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import kernels_writing, segment_nodes
from fluxc.numerics import FP8_LINEAR_SQNR_DB, REWRITE_TOLERANCE, relative_error, sqnr_db
from fluxc.runtime.ops.fp8_gemm import dequantize_activation, fp8_linear_reference
from fluxc.runtime.ops.kernels import quantize_rows


def operands(m: int, k: int, n: int, seed: int = 0):
    """A bf16 activation quantized per token and a weight per output channel, as quantize_fp8 makes them (with
    outlier channels in x, as FLUX's activations have), a bias, and the float64 values they stand for."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (1 + 8 * (torch.rand(k, generator=g) < 0.02))
    w = torch.randn(n, k, generator=g) / k ** 0.5
    bias = (torch.randn(n, generator=g) * 0.1).bfloat16()
    (a, a_scale), (wq, w_scale) = quantize_rows(x.bfloat16()), quantize_rows(w.bfloat16())
    exact = x.bfloat16().double() @ w.bfloat16().double().T + bias.double()
    return (a, a_scale, wq, w_scale, bias), exact


def test_gelu_fp8_block_output_meets_the_floor_and_the_unfused_path():
    """The fused up-projection's output, dequantized, against float64 GELU(x w^T + b): at least the FP8 linear floor,
    and at least the SQNR of today's path (_scaled_mm to bf16, then fluxc.gelu_fp8 per token)."""
    ops, exact = operands(256, 384, 512)
    want = F.gelu(exact, approximate="tanh")
    q, q_scale = torch.ops.fluxc.fp8_linear_gelu_fp8(*ops)
    assert q.dtype == torch.float8_e4m3fn and q_scale.shape == (256, 4)
    fused = sqnr_db(dequantize_activation(q, q_scale), want)
    unfused = sqnr_db(dequantize_activation(*torch.ops.fluxc.gelu_fp8(fp8_linear_reference(*ops))), want)
    print(f"GELU output against float64: block scales {fused:.1f} dB, per-token {unfused:.1f} dB")
    assert fused >= FP8_LINEAR_SQNR_DB and fused >= unfused


def test_down_projection_reads_block_scaled_activations():
    """The MLP whole: the block-quantized GELU output into the gated down-projection, against float64."""
    ops, exact = operands(256, 384, 512, seed=1)
    q, q_scale = torch.ops.fluxc.fp8_linear_gelu_fp8(*ops)
    g = torch.Generator().manual_seed(2)
    w2 = torch.randn(384, 512, generator=g) / 512 ** 0.5
    w2q, w2_scale = quantize_rows(w2.bfloat16())
    gate, residual = torch.randn(2, 384, generator=g).bfloat16(), torch.randn(2, 128, 384, generator=g).bfloat16()
    got = torch.ops.fluxc.fp8_linear_gate_residual(q, q_scale, w2q, w2_scale, None, gate, residual)
    mlp = (F.gelu(exact, approximate="tanh") @ w2.bfloat16().double().T).view(2, 128, 384)
    assert sqnr_db(got.double() - residual.double(), gate.double()[:, None] * mlp) >= FP8_LINEAR_SQNR_DB


def test_gate_residual_equals_the_bf16_graph_within_rounding():
    """residual + gate * y in fp32 rounded once, against the unfused bf16 graph's two roundings."""
    ops, _ = operands(2 * 96, 256, 384, seed=3)
    g = torch.Generator().manual_seed(4)
    gate, residual = torch.randn(2, 384, generator=g).bfloat16(), torch.randn(2, 96, 384, generator=g).bfloat16()
    got = torch.ops.fluxc.fp8_linear_gate_residual(*ops, gate, residual)
    want = residual + gate[:, None] * fp8_linear_reference(*ops).view(2, 96, 384)
    assert relative_error(got, want) <= REWRITE_TOLERANCE[torch.bfloat16]


INTERPRETED = r"""
import sys, torch
sys.path.insert(0, "tests")
from test_fp8_gemm import operands
from fluxc.numerics import relative_error
from fluxc.runtime.ops import fp8_gemm as f
from fluxc.runtime.ops.fp8_gemm import dequantize_activation as dq

loads, *flags = sys.argv[2].split("+")  # "tma+flatten+tma_store": the Config's flags
m, config = int(sys.argv[1]), f.Config(64, 128, 4, 2, loads, **{flag: True for flag in flags})
ops, _ = operands(m, 256, 256, seed=5)
a, a_scale, w, w_scale, bias = ops
errors = {}
x = dq(a, a_scale)
one = x.abs().amax().reshape(1, 1) / 448  # a per-tensor scale, as the FP8 attention output has
scalings = {"rows": (a, a_scale), "tensor": ((x / one).to(torch.float8_e4m3fn), one),
            "blocks": f.quantize_blocks(x)}  # as fp8_linear_gelu_fp8 writes its output
for name, (xq, x_scale) in scalings.items():
    out = torch.empty(m, 256, dtype=torch.bfloat16)
    f.launch(xq, x_scale, w, w_scale, bias, out, f.EPILOGUE_BF16, config=config)
    errors[f"bf16 {name}"] = relative_error(out, f.fp8_linear_reference(xq, x_scale, w, w_scale, bias))
a, a_scale = scalings["blocks"]
q, q_scale = torch.empty(m, 256, dtype=torch.float8_e4m3fn), torch.empty(m, 2)
f.launch(a, a_scale, w, w_scale, bias, q, f.EPILOGUE_GELU_FP8, out_scale=q_scale,
         config=config._replace(tma_store=False))  # the GELU epilogue stores from registers
want, want_scale = torch.ops.fluxc.fp8_linear_gelu_fp8(a, a_scale, w, w_scale, bias)
errors["gelu_fp8 scales"] = relative_error(q_scale, want_scale)
e4m3 = relative_error(dq(q, q_scale), dq(want, want_scale))
gate, residual = torch.randn(2, 256).bfloat16(), torch.randn(2, m // 2, 256).bfloat16()
for name in ("blocks", "tensor"):  # the MLP's and the attention's output projections
    a, a_scale = scalings[name]
    out = torch.empty_like(residual)
    f.launch(a, a_scale, w, w_scale, None, out, f.EPILOGUE_GATE_RESIDUAL, gate=gate, residual=residual, config=config)
    errors[f"gate_residual {name}"] = relative_error(
        out, torch.ops.fluxc.fp8_linear_gate_residual(a, a_scale, w, w_scale, None, gate, residual))
# a single block's output projection, joined: the attention half (one scale) leads the MLP half's K loop
if loads == "tma" and not flags:
    (_, _, w2, w2_scale, _), _ = operands(m, 256, 256, seed=6)
    for name in ("rows", "blocks"):
        a, a_scale = scalings[name]
        lead = (*scalings["tensor"], w2, w2_scale)
        out = torch.empty_like(residual)
        f.launch(a, a_scale, w, w_scale, bias, out, f.EPILOGUE_GATE_RESIDUAL, gate=gate, residual=residual,
                 lead=lead, config=config)
        errors[f"joined {name}"] = relative_error(
            out, torch.ops.fluxc.fp8_linear_gate_residual(a, a_scale, w, w_scale, bias, gate, residual, *lead))
print(errors, e4m3)
assert max(errors.values()) <= 1e-2 and e4m3 <= 0.1, (errors, e4m3)
"""


@pytest.mark.parametrize("loads", ["pointers", "tma", "tma+flatten+tma_store"])
@pytest.mark.parametrize("m", [256, 200])  # 200: a partial tile of rows (masked loads and stores, clipped TMA stores)
def test_triton_kernel_in_the_interpreter_matches_the_reference_ops(m, loads):
    """The Triton kernel itself, every epilogue (the GELU's without TMA stores, which it does not take) and each
    activation scaling (per token, per tensor, 1x128 blocks; the gated residual: the last two, as FLUX's output
    projections read them), run on the CPU by Triton's interpreter
    (TRITON_INTERPRET=1 must be set before the kernels are defined, hence a fresh process), against the reference
    ops. This checks the kernel's indexing, masking, scales and epilogues, not its roundings: the interpreter
    (Triton 3.9) truncates fp32 to bf16 (about half of all values differ from torch's round-to-nearest by one
    ulp), so the bf16 outputs agree to ~4e-3 and the e4m3 ones, whose codes follow the bf16 values, to ~5e-2 (a
    wrong scale block or gate row errs by O(1)). tests/test_gpu.py holds the compiled kernel to rounding."""
    pytest.importorskip("triton", reason="Triton is not installed")
    done = subprocess.run([sys.executable, "-c", INTERPRETED, str(m), loads], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, TRITON_INTERPRET="1"),
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("loads", ["pointers", "tma", "tma+flatten+tma_store", "tma+warp_specialize", "tma+joined"])
@pytest.mark.parametrize("epilogue", ["bf16", "gelu_fp8", "gate_residual"])
@pytest.mark.parametrize("scales", ["rows", "blocks", "tensor"])
def test_triton_kernel_compiles_to_hopper_tensor_cores(epilogue, scales, loads):
    """Each variant compiled for sm_90a here (Triton bundles ptxas): its e4m3 dot becomes wgmma, Hopper's
    asynchronous warpgroup MMA, the TMA variant's loads the bulk tensor copy (and its TMA stores the bulk copy
    out of shared memory), and the cubin is made; warp specialized, the kernel splits into a producer and consumer
    warp groups that trade registers (setmaxnreg), not a uniform kernel with the loop's attribute ignored. Joined
    (a single block's output projection: a per-tensor-scaled lead GEMM, then this one's K loop), with the gated
    residual, the epilogue it is built for."""
    triton = pytest.importorskip("triton", reason="Triton is not installed")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fluxc.runtime.ops import fp8_gemm

    number = {"bf16": fp8_gemm.EPILOGUE_BF16, "gelu_fp8": fp8_gemm.EPILOGUE_GELU_FP8,
              "gate_residual": fp8_gemm.EPILOGUE_GATE_RESIDUAL}[epilogue]
    if epilogue == "gelu_fp8" and "tma_store" in loads:
        pytest.skip("the GELU epilogue stores its e4m3 codes and scales from registers")
    if scales == "tensor" and epilogue == "gelu_fp8":
        pytest.skip("a per-tensor scale is the FP8 attention output's, which the output projections read")
    if "joined" in loads and (epilogue != "gate_residual" or scales == "tensor"):
        pytest.skip("a lead GEMM joins the MLP half of a single block's gated output projection")
    a_scales = getattr(fp8_gemm, f"SCALES_{scales.upper()}")
    config = fp8_gemm.CONFIGS.get((number, a_scales == fp8_gemm.SCALES_BLOCKS), fp8_gemm.Config())  # as the ops launch
    config = fp8_gemm.JOINED_CONFIG if "joined" in loads else config
    out = "*fp8e4nv" if epilogue == "gelu_fp8" else "*bf16"
    tma = loads.startswith("tma")
    flags = {flag.upper(): flag in loads for flag in ("flatten", "tma_store", "warp_specialize", "joined")}
    tma_args = {"a0_ptr": "*fp8e4nv", "a0_scale_ptr": "*fp32", "b0_ptr": "*fp8e4nv", "b0_scale_ptr": "*fp32",
                "K0": "i32", "A0_SCALES": "constexpr", "PROGRAMS": "constexpr", **dict.fromkeys(flags, "constexpr")}
    signature = {"a_ptr": "*fp8e4nv", "a_scale_ptr": "*fp32", "b_ptr": "*fp8e4nv", "b_scale_ptr": "*fp32",
                 "bias_ptr": "*bf16", "out_ptr": out, "out_scale_ptr": "*fp32", "gate_ptr": "*bf16",
                 "residual_ptr": "*bf16",
                 **{p: "i32" for p in ("M", "N", "K", "rows_per_batch", "gate_stride")},
                 **{p: "constexpr" for p in ("A_SCALES", "HAS_BIAS", "EPILOGUE", "BLOCK_M", "BLOCK_N", "BLOCK_K",
                                             "GROUP_M")}, **(tma_args if tma else {})}
    constexprs = {"A_SCALES": a_scales, "HAS_BIAS": True, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                  "BLOCK_K": 128, "GROUP_M": 8, "EPILOGUE": number,
                  **({"PROGRAMS": 132, "A0_SCALES": fp8_gemm.SCALES_TENSOR, **flags} if tma else {})}
    kernel = fp8_gemm._fp8_gemm_tma_kernel if tma else fp8_gemm._fp8_gemm_kernel
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 128),
                              options={"num_warps": 4 if flags["WARP_SPECIALIZE"] else config.warps,
                                       "num_stages": config.stages})
    ptx = compiled.asm["ptx"]
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx
    assert not tma or "cp.async.bulk.tensor" in ptx
    assert not flags["TMA_STORE"] or "cp.async.bulk.tensor.2d.global.shared" in ptx
    assert not flags["WARP_SPECIALIZE"] or ("setmaxnreg" in ptx and compiled.metadata.num_warps > 4)
    assert len(compiled.asm["cubin"]) > 1000


@pytest.mark.parametrize("loads", ["pointers", "tma"])
def test_compiled_segments_see_the_triton_kernel_and_what_it_writes(hopper_driver, loads, monkeypatch):
    """The ops are triton_ops: AOTAutograd (what Inductor compiles a segment from) traces a CUDA call into the
    Triton kernel itself, so Inductor compiles it into the segment and the engine carries its binary, instead of
    an opaque call that Triton's JIT compiles at the first generate. Torch's analysis of the kernel finds that it
    writes only the op's outputs (an input it thought written would be cloned on every call). fp8_linear with
    fewer than CUBLAS_BELOW rows (a text stream's) is cuBLAS's _scaled_mm instead."""
    from fluxc.runtime.ops import fp8_gemm

    monkeypatch.setattr(fp8_gemm, "CONFIGS", {k: c._replace(loads=loads) for k, c in fp8_gemm.CONFIGS.items()})
    monkeypatch.setattr(fp8_gemm, "multiprocessors", lambda device: 132)  # an H100's SMs: there is no GPU to ask
    e4, f32, bf16 = torch.float8_e4m3fn, torch.float32, torch.bfloat16
    up = segment_nodes(torch.ops.fluxc.fp8_linear_gelu_fp8, 2, ((256, 256), e4), ((256, 1), f32), ((384, 256), e4),
                       ((384, 1), f32), ((384,), bf16))
    down = segment_nodes(torch.ops.fluxc.fp8_linear_gate_residual, 0, ((256, 384), e4), ((256, 3), f32),
                         ((256, 384), e4), ((256, 1), f32), None, ((2, 256), bf16), ((2, 128, 256), bf16))
    plain, few = (segment_nodes(torch.ops.fluxc.fp8_linear, 0, ((m, 256), e4), ((m, 1), f32), ((384, 256), e4),
                                ((384, 1), f32), ((384,), bf16)) for m in (fp8_gemm.CUBLAS_BELOW, 512))
    assert kernels_writing(up) == [["out_ptr", "out_scale_ptr"]] and kernels_writing(down) == [["out_ptr"]]
    assert kernels_writing(plain) == [["out_ptr"]]
    assert kernels_writing(few) == [] and torch.ops.aten._scaled_mm.default in [n.target for n in few]


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_gate_residual_fuses_only_bf16_gemm_outputs(out_dtype):
    """fuse_fp8_epilogues on a traced output projection: a bf16 _scaled_mm's gated residual becomes the fused op and
    computes what the graph did (within the bf16 rewrite tolerance); a GEMM writing float32 is left alone with the
    reason (the kernel rounds to bf16 where that graph does not)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fluxc.passes import fuse_fp8_epilogues
    from fluxc.passes.base import PassContext
    from fluxc.recipes import RECIPES

    (a, a_scale, w, w_scale, bias), _ = operands(2 * 64, 256, 384, seed=5)
    g = torch.Generator().manual_seed(6)
    gate, residual = torch.randn(2, 384, generator=g).bfloat16(), torch.randn(2, 64, 384, generator=g).bfloat16()

    def projection(a, a_scale, w, w_scale, bias, gate, residual):
        y = torch._scaled_mm(a, w.t(), a_scale, w_scale.t(), bias, out_dtype=out_dtype)
        return residual + gate.unsqueeze(1) * y.view(2, 64, 384)

    args = (a, a_scale, w, w_scale, bias, gate, residual)
    gm = make_fx(projection, tracing_mode="fake")(*args)
    want = gm(*args)
    result = fuse_fp8_epilogues.run(gm, PassContext(RECIPES["sm90_fp8_epilogues"](), "cpu", "double"))
    if out_dtype == torch.bfloat16:
        assert result.counts["gate_residual"] == 1
        assert relative_error(result.graph(*args).float(), want.float()) <= REWRITE_TOLERANCE[torch.bfloat16]
    else:
        assert result.counts["gate_residual"] == 0
        assert any("writes torch.float32" in r.reason for r in result.rejected), result.rejected


def test_wide_tiles_narrow_where_the_last_wave_would_idle():
    """fp8_gemm.choose on an H100's 132 SMs: 128x256 tiles where they fill the waves as well as 128x128 ones would
    (a double block's image MLP down-projection, 4096 x 3072: 384 tiles, 97% busy), 128x128 with one more stage where
    the last wave of wide tiles is mostly empty (a single block's output projection, 4608 x 3072: 432 tiles, 82%
    against 94%; the text stream's 512 x 3072: 48 tiles on 132 SMs); tile configs without 256 columns as given."""
    from fluxc.runtime.ops.fp8_gemm import CONFIGS, EPILOGUE_BF16, EPILOGUE_GATE_RESIDUAL, Config, choose

    wide = CONFIGS[(EPILOGUE_GATE_RESIDUAL, False)]
    narrow = wide._replace(block_n=128, stages=wide.stages + 1)
    assert (wide.block_m, wide.block_n) == (128, 256)
    assert choose(wide, 4096, 3072, 132) == wide
    assert choose(CONFIGS[(EPILOGUE_BF16, False)], 4608, 21504, 132).block_n == 256
    assert choose(wide, 4608, 3072, 132) == narrow and choose(wide, 512, 3072, 132) == narrow
    assert choose(Config(256, 128, 8, 3), 512, 3072, 132) == Config(256, 128, 8, 3)


@pytest.mark.parametrize("faster", ["triton", "cublas"])
def test_plain_gemms_go_where_the_building_gpu_measured_them_faster(faster, hopper_driver, monkeypatch):
    """fuse_fp8_epilogues' "plain" on a GEMM traced on (fake) CUDA tensors asks fluxc.tactics for both candidates'
    times at the shape and rewrites to the Triton kernel only where it was faster, saying why where it does not; the
    GEMMs the op leaves to cuBLAS anyway (fewer than CUBLAS_BELOW rows) are not measured; the pass reports what was
    measured (the manifest's pass_reports: why a build chose cuBLAS for a shape). The measurement is
    replaced here (it needs the GPU; scripts/gpu_tests.sh's transformer job records what an H200 chose)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from fluxc import tactics
    from fluxc.passes import fuse_fp8_epilogues
    from fluxc.passes.base import PassContext
    from fluxc.recipes import RECIPES
    from fluxc.runtime.ops import fp8_gemm
    from fluxc.runtime.ops.fp8_gemm import CUBLAS_BELOW

    asked, timings = [], {"triton": 1.0, "cublas": 2.0} if faster == "triton" else {"triton": 2.0, "cublas": 1.0}

    def measured(m, n, k, bias, device):
        asked.append((m, n, k, bias, device.type))
        return timings

    monkeypatch.setattr(tactics, "fp8_linear_ms", measured)
    monkeypatch.setattr(fp8_gemm, "multiprocessors", lambda device: 132)  # (the rewritten op's fake launches ask)
    e4, f32, bf16 = torch.float8_e4m3fn, torch.float32, torch.bfloat16

    def gemms(a, sa, w, sw, bias, text, text_scale):
        return (torch._scaled_mm(a, w.t(), sa, sw.t(), bias, out_dtype=bf16),
                torch._scaled_mm(text, w.t(), text_scale, sw.t(), bias, out_dtype=bf16))

    with FakeTensorMode():
        args = [torch.empty(shape, dtype=dtype, device="cuda") for shape, dtype in
                (((CUBLAS_BELOW, 256), e4), ((CUBLAS_BELOW, 1), f32), ((384, 256), e4), ((384, 1), f32), ((384,), bf16),
                 ((512, 256), e4), ((512, 1), f32))]
    gm = make_fx(gemms, tracing_mode="fake")(*args)
    result = fuse_fp8_epilogues.run(gm, PassContext(RECIPES["sm90_fp8_epilogues"](), "sm_90", "double"))
    assert asked == [(CUBLAS_BELOW, 384, 256, True, "cuda")]
    assert result.report == {"plain_ms": {f"{CUBLAS_BELOW}x384x256": timings}}
    left = [n for n in gm.graph.nodes if n.target is torch.ops.aten._scaled_mm.default]
    if faster == "triton":
        assert result.counts["plain"] == 2 and not left  # (the text stream's op calls cuBLAS itself)
    else:
        assert result.counts["plain"] == 1 and len(left) == 1 and left[0].args[0].meta["val"].shape[0] == CUBLAS_BELOW
        assert [r.reason for r in result.rejected] == [
            f"cuBLAS measured faster on this GPU at {CUBLAS_BELOW}x384x256: 1.000 ms against the Triton kernel's 2.000"]


@pytest.mark.gpu
def test_plain_gemm_choice_on_this_gpu_follows_its_timings_and_keeps_the_result():
    """On a real GPU, unreplaced: fluxc.tactics times both kernels at a FLUX-sized plain GEMM (two positive
    timings, each within 2x of the same calls timed back to back by CUDA events outside a graph), the pass keeps the
    faster, and the graph computes what it did before (within bf16 rounding of the other kernel's sum order)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fluxc import tactics
    from fluxc.passes import fuse_fp8_epilogues
    from fluxc.passes.base import PassContext
    from fluxc.recipes import RECIPES
    from fluxc.runtime.ops import fp8_gemm

    m, n, k = 4096, 9216, 3072  # a double block's image QKV: ~0.18 ms, well above a launch's host time
    ops, _ = operands(m, k, n, seed=7)
    args = [t.cuda() for t in ops]

    def gemm(a, sa, w, sw, bias):
        return torch._scaled_mm(a, w.t(), sa, sw.t(), bias, out_dtype=torch.bfloat16)

    gm = make_fx(gemm, tracing_mode="fake")(*args)
    want = gm(*args)
    result = fuse_fp8_epilogues.run(gm, PassContext(RECIPES["sm90_fp8_epilogues"](), "sm_90", "double"))
    ms = tactics.fp8_linear_ms(m, n, k, True, args[0].device)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    candidates = {"triton": lambda: fp8_gemm.launch(*args, out, fp8_gemm.EPILOGUE_BF16, traceable=False),
                  "cublas": lambda: gemm(*args)}
    for name, fn in candidates.items():
        assert 0 < ms[name] and 0.5 < tactics.cuda_ms(fn, warmup=1, iters=3, calls=20) / ms[name] < 2, (name, ms)
    assert result.counts["plain"] == (ms["triton"] < ms["cublas"]), (ms, result.rejected)
    assert relative_error(gm(*args).float(), want.float()) <= REWRITE_TOLERANCE[torch.bfloat16]
