"""Context parallelism (issue 10) on the CPU: tiny engines built with --world-size 2, run as 2 gloo ranks through
torchrun's launcher (fluxc.runtime.parallel.launch), against one process and against diffusers' FluxPipeline."""

import numpy as np
import pytest
import torch

from conftest import random_embeddings
from fluxc.runtime.engine import run_engine

TEXT = 16  # the tiny T5 length here: 2 ranks take 8 text tokens each
SIZE = (128, 112)  # 8 x 7 = 56 image tokens: 28 per rank


def _build(path, model, world_size, precision="fp32", **kw):
    from fluxc.build import BuildOptions, build

    build(BuildOptions(model=model, output=str(path), target="cpu", precision=precision, resolutions=(SIZE,),
                       text_tokens=TEXT, world_size=world_size, **kw))
    return str(path)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory, tiny_pipeline_dir):
    """Whole-pipeline fp32 engines (encoders, transformer, VAE) for 1 and 2 ranks."""
    root = tmp_path_factory.mktemp("parallel")
    return {n: _build(root / f"ws{n}.fluxe", tiny_pipeline_dir, n) for n in (1, 2)}


def test_two_gloo_ranks_make_the_same_image_as_one_process_and_as_diffusers(pipelines, tiny_pipeline_dir):
    from diffusers import FluxPipeline

    from fluxc.runtime import Engine, parallel

    prompt = "a photo of a cat sitting on a red chair"
    kw = dict(prompt=prompt, height=SIZE[0], width=SIZE[1], steps=4, seed=3, output_type="np")
    two = parallel.launch(2, run_engine, pipelines[2], "generate", kw, backend="gloo")
    one = Engine.load(pipelines[1]).generate(**kw)
    ref = FluxPipeline.from_pretrained(tiny_pipeline_dir, torch_dtype=torch.float32)(
        prompt, height=SIZE[0], width=SIZE[1], num_inference_steps=4, guidance_scale=3.5, max_sequence_length=TEXT,
        generator=torch.Generator("cpu").manual_seed(3), output_type="np").images
    assert two.shape == one.shape == ref.shape and ref.std() > 0.05
    assert np.abs(two - one).max() <= 1e-3 and np.abs(two - ref).max() <= 1e-3


def _ulysses_rank(heads: int, tokens: int, batch: int, e4m3: bool = False):
    """On each rank: the three Ulysses steps on this rank's query/key/value rows (stored [B, S, H, D], as the
    segments hold them), with other work between them as shard_attention places it, and the same with the send
    taking q and k before qk_norm_rope (text and image parts, as a double block has them), against softmax
    attention in float64 over every rank's rows; returns the largest difference and the lowest SQNR. e4m3: bf16
    rows sent as e4m3 (an FP8 engine's transfers)."""
    from fluxc.numerics import sqnr_db
    from fluxc.runtime.ops import kernels
    from fluxc.runtime import parallel

    n, r = parallel.world_size(), parallel.rank()
    g = torch.Generator().manual_seed(0)  # every rank draws the whole sequence
    dtype = torch.bfloat16 if e4m3 else torch.float32
    raw = [torch.randn(batch, tokens, heads, 16, generator=g).to(dtype) for _ in range(3)]  # q, k before the norm, v
    weights = [torch.rand(16, generator=g) + 0.5 for _ in range(4)]  # q's and k's RMSNorm weights, per part
    angles = torch.rand(tokens, 8, generator=g) * 6
    cos, sin = (f(angles).repeat_interleave(2, -1) for f in (torch.cos, torch.sin))
    text = tokens // (2 * n)  # each rank's first rows are its text tokens
    normed = [kernels.norm_rope_reference([x[:, :text * n], x[:, text * n:]], w, cos, sin, 1e-6)
              for x, w in ((raw[0], weights[:2]), (raw[1], weights[2:]))]
    q, k, v = (x.transpose(1, 2) for x in (*normed, raw[2]))
    rows = torch.cat([torch.arange(r * text, (r + 1) * text),  # this rank's text rows, then its image rows
                      text * n + torch.arange(r * (tokens - text * n) // n, (r + 1) * (tokens - text * n) // n)])
    ops = torch.ops.fluxc
    outs = []
    sends = (lambda: ops.ulysses_send(*(x[:, :, rows] for x in (q, k, v)), e4m3),
             lambda: ops.ulysses_send_qk(*([x[:, rows[:text]], x[:, rows[text:]]] for x in raw[:2]), weights[:2],
                                         weights[2:], cos[rows], sin[rows], 1e-6, v[:, :, rows], e4m3))
    for send in sends:  # one attention's steps at a time, as a segment runs them
        back = ops.ulysses_attend(send(), [q[:, :, rows] @ k[:, :, rows].transpose(-1, -2)], 0.3)
        outs.append(ops.ulysses_receive(back, [v[:, :, rows] * 2]))
    ref = torch.softmax(q[:, :, rows].double() @ k.double().transpose(-1, -2) * 0.3, dim=-1) @ v.double()
    return (max((out.double() - ref).abs().max().item() for out in outs),
            min(sqnr_db(out.double(), ref) for out in outs))


# 2, 2 and 1 (3 heads per rank) parts; batch 2 (the layouts on the wire put the batch inside the tokens)
@pytest.mark.parametrize("world, heads, batch", [(2, 8, 1), (4, 8, 1), (2, 6, 1), (2, 8, 2)])
def test_ulysses_attention_on_gloo_ranks_equals_attention_over_all_tokens(world, heads, batch):
    from fluxc.runtime import parallel

    assert parallel.launch(world, _ulysses_rank, heads, 24 * world, batch, backend="gloo")[0] <= 1e-5


@pytest.mark.parametrize("world", [1, 2])
def test_e4m3_transfers_hold_the_wire_floor(world):
    """FP8 engines send q, k, v as e4m3 rows with a scale each (runtime/ops/ulysses.py): on 2 gloo ranks, and in one
    process (the build's check of an N-rank graph), attention's output against float64 attention over the bf16
    rows keeps numerics.FP8_WIRE_SQNR_DB, both sends (q, k as given, and from qk_norm_rope)."""
    from fluxc.numerics import FP8_WIRE_SQNR_DB
    from fluxc.runtime import parallel

    _, sqnr = (parallel.launch(world, _ulysses_rank, 8, 24 * world, 1, True, backend="gloo") if world > 1
               else _ulysses_rank(8, 24, 1, True))
    print(f"{world} rank(s): attention output over e4m3 transfers {sqnr:.1f} dB against float64")
    assert sqnr >= FP8_WIRE_SQNR_DB


def test_fp8_engine_on_two_ranks_sends_e4m3_and_keeps_the_floor(tmp_path):
    """The tiny fp8 transformer built for 2 ranks sends e4m3 (shard_attention's count) and its 8-step latents on 2
    gloo ranks stay within the tiny fp8 engine floor of the 1-rank fp8 engine's (which transfers nothing)."""
    import json

    from fluxc.numerics import sqnr_db
    from fluxc.runtime import Engine, parallel
    from fluxc.runtime.core.bundle import MANIFEST
    from test_fp8 import TINY_FP8_ENGINE_SQNR_DB

    paths = {n: _build(tmp_path / f"fp8-ws{n}.fluxe", "tiny", n, transformer_only=True, precision="fp8")
             for n in (1, 2)}
    counts = json.load(open(f"{paths[2]}/{MANIFEST}"))["pass_counts"]
    assert counts["double-128x112"]["shard_attention"]["e4m3"] == 1
    assert counts["single-128x112"]["shard_attention"]["e4m3"] == 1
    pe, pooled = random_embeddings(text=TEXT, dtype=torch.bfloat16)
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, height=SIZE[0], width=SIZE[1], steps=8, seed=5)
    two = parallel.launch(2, run_engine, paths[2], "denoise", kw, backend="gloo")
    one = Engine.load(paths[1]).denoise(**kw)
    sqnr = sqnr_db(two.double(), one.double())
    print(f"tiny fp8 engine, 2 ranks with e4m3 transfers against 1 rank: {sqnr:.1f} dB")
    assert sqnr >= TINY_FP8_ENGINE_SQNR_DB


def test_kernel_quantizes_heads_as_the_reference():
    """kernels.quantize_heads' Triton path (run by Triton's interpreter in a fresh process) writes the same e4m3
    codes and scale bytes as the torch reference, into a strided send-buffer slot; dequantize_heads reads them."""
    pytest.importorskip("triton", reason="Triton is not installed")
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", QUANTIZE_HEADS], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert done.returncode == 0, done.stderr[-3000:]


QUANTIZE_HEADS = """
import torch
from fluxc.numerics import FP8_WIRE_SQNR_DB, sqnr_db
from fluxc.runtime.ops import kernels

g = torch.Generator().manual_seed(0)
src = (torch.randn(2, 5, 6, 16, generator=g) * torch.rand(2, 5, 6, 1, generator=g) * 4).bfloat16()
heads = src.unflatten(2, (2, 1, 3))  # [B, S, rank, part, head, D]
# send buffers as runtime/ops/ulysses.py lays them out: [part, rank, token, batch, q|k|v, head, D + 4]; k's slot
want = torch.zeros(1, 2, 5, 2, 3, 3, 20, dtype=torch.uint8)
got = want.clone()
kernels.quantize_heads(want[..., 1, :, :].permute(3, 2, 1, 0, 4, 5), heads)
slot = got[..., 1, :, :].permute(3, 2, 1, 0, 4, 5)
kernels._copy_heads_kernel[(10,)](heads, slot, 5, 1, 3, *heads.stride()[:5], *slot.stride()[:5], G=6, D=16, BLOCK_G=8,
                                  QUANT=True)
codes = lambda t: t[..., :16].view(torch.float8_e4m3fn).float()
assert torch.equal(got[..., 16:], want[..., 16:]), "scales differ"
assert (codes(got) != codes(want)).float().mean() < 0.02  # y * (1 / scale) against y / scale: near-ties only
assert not got[..., 0, :, :].any() and not got[..., 2, :, :].any()  # q's and v's slots untouched
back = kernels.dequantize_heads(slot)
assert back.shape == heads.shape and sqnr_db(back.double(), heads.double()) >= FP8_WIRE_SQNR_DB
# the receiving side's kernel (a landed part: contiguous rows), against the reference dequantization
part = got[0, :, :, :, 1].contiguous()  # [rank, token, batch, head, D + 4]: 60 rows, a partial block of 16
dequantized = torch.empty(*part.shape[:-1], 16, dtype=torch.bfloat16)
kernels._dequantize_rows_kernel[(4,)](part, dequantized, 60, D=16, BLOCK_R=16)
# codes x scale is exact in fp32; the interpreter's cast to bf16 truncates where torch rounds: one ulp at most
assert torch.allclose(dequantized.float(), kernels.dequantize_heads(part).float(), rtol=2 ** -7, atol=0)

# qk_norm_rope's kernel quantizing as it writes the send buffer (ulysses_send_qk), against its reference path
qkv = [torch.randn(2, n, 3, 6, 16, generator=g).bfloat16() for n in (2, 3)]  # text and image parts
q_parts, k_parts = [x[:, :, 0] for x in qkv], [x[:, :, 1] for x in qkv]
weights = [(torch.rand(16, generator=g) + 0.5).bfloat16() for _ in range(4)]
angles = torch.randn(5, 8, generator=g).repeat_interleave(2, dim=1)
args = (q_parts, k_parts, weights[:2], weights[2:], angles.cos(), angles.sin(), 1e-6)
want, got = torch.zeros(1, 2, 5, 2, 3, 3, 20, dtype=torch.uint8), torch.zeros(1, 2, 5, 2, 3, 3, 20, dtype=torch.uint8)
kernels.qk_norm_rope_into(*args, *(want[..., i, :, :].permute(3, 2, 1, 0, 4, 5) for i in range(2)), e4m3=True)
kernels._launch_qk_norm_rope(*args, *(got[..., i, :, :].permute(3, 2, 1, 0, 4, 5) for i in range(2)),
                             mode=kernels.NORM_ROPE_ROW_E4M3)
scales = lambda t: t[..., 16:].contiguous().view(torch.float32)
# the interpreter truncates the kernel's fp32 norm and rotation math to bf16 (see tests/test_fp8_gemm.py), a few bf16
# ulps by the amax; tests/test_gpu.py holds the compiled kernel to the scales' bytes
assert torch.allclose(scales(got), scales(want), rtol=2 ** -5), "scales differ beyond a few bf16 ulps"
assert (codes(got) != codes(want)).float().mean() < 0.1
assert not got[..., 2, :, :].any()
for heads_per_program in (2, 4):  # a token's 6 heads over 3 programs, or 2 with 2 rows masked: the same bytes
    kernels.QK_NORM_ROPE_HEADS = heads_per_program
    split = torch.zeros_like(got)
    kernels._launch_qk_norm_rope(*args, *(split[..., i, :, :].permute(3, 2, 1, 0, 4, 5) for i in range(2)),
                                 mode=kernels.NORM_ROPE_ROW_E4M3)
    assert torch.equal(split, got), f"{heads_per_program} heads per program"
"""


@pytest.mark.parametrize("policy, threshold", [("fbcache", 0.6), ("teacache", 1.0)])
def test_ranks_make_one_cache_decision_from_all_tokens(tmp_path, policy, threshold):
    """Each rank sees half the tokens; the decision's means are all-reduced, so the 2-rank run skips exactly the
    steps the one-process run skips (a mixed pattern at these thresholds), with the same latents."""
    from fluxc.runtime import Engine, parallel
    from fluxc.runtime.core.cache_config import CacheConfig

    engines = {n: _build(tmp_path / f"t{n}.fluxe", "tiny", n, transformer_only=True) for n in (1, 2)}
    pe, pooled = random_embeddings(text=TEXT)
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, height=SIZE[0], width=SIZE[1], steps=8, seed=5,
              cache_config=CacheConfig(policy=policy, threshold=threshold))
    one_report, two_report = {}, {}
    one = Engine.load(engines[1]).denoise(**kw, report=one_report)
    two, two_report = parallel.launch(2, _denoise_with_report, engines[2], kw, backend="gloo")
    skipped = one_report["cache"]["skipped_steps"]
    assert 0 < len(skipped) < 7 and two_report["cache"]["skipped_steps"] == skipped
    assert (two - one).abs().max() <= 1e-3


def _denoise_with_report(path, kw):
    from fluxc.runtime import Engine, parallel

    report = {}
    latents = Engine.load(path).denoise(**kw, report=report)
    return (latents, report) if parallel.rank() == 0 else None


def test_a_failing_rank_is_reported_by_rank_and_stops_the_run(pipelines):
    """A 1-rank engine launched on 2 ranks: both refuse it; the launcher stops and names a rank, no hang."""
    from fluxc.runtime import parallel
    from fluxc.runtime.core.errors import FluxcError

    with pytest.raises(FluxcError, match=r"Rank \d of 2 failed: .*built for 1 rank"):
        parallel.launch(2, run_engine, pipelines[1], "generate", dict(prompt="x", steps=1), backend="gloo")


def test_a_two_rank_engine_in_one_process_says_how_to_launch_it(pipelines):
    from fluxc.runtime import Engine
    from fluxc.runtime.core.errors import FluxcError

    with pytest.raises(FluxcError, match="--gpus 2"):
        Engine.load(pipelines[2])


@pytest.mark.parametrize("world_size, resolution, message", [
    (3, SIZE, "does not divide the model's"),  # tiny's heads, text tokens and image tokens are not multiples of 3
    (2, (144, 112), "63 image tokens at 144x112"),
    (0, SIZE, "less than 1"),
])
def test_world_sizes_that_cannot_split_the_tokens_are_refused(tmp_path, world_size, resolution, message):
    from fluxc.build import BuildOptions, build
    from fluxc.runtime.core.errors import FluxcError

    out = tmp_path / "e.fluxe"
    with pytest.raises(FluxcError, match=message):
        build(BuildOptions(model="tiny", output=str(out), target="cpu", resolutions=(resolution,), text_tokens=TEXT,
                           world_size=world_size, transformer_only=True))
    assert not out.exists()


@pytest.mark.gpu
def test_two_nccl_ranks_in_cuda_graphs_match_one_gpu(tmp_path):
    """On 2 GPUs: the bf16 engine's step, all-to-alls included, captured as CUDA graphs on each rank; the latents
    match one GPU's to bf16 rounding noise (the ranks' GEMMs see other row counts)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (scripts/gpu_tests.sh on the nvidia-h200-x2 or x4 kind)")
    from fluxc.build import BuildOptions, build
    from fluxc.numerics import sqnr_db
    from fluxc.runtime import Engine, parallel

    paths = {}
    for n in (1, 2):
        paths[n] = str(tmp_path / f"ws{n}.fluxe")
        build(BuildOptions(model="tiny", output=paths[n], precision="bf16", resolutions=(SIZE,), text_tokens=TEXT,
                           world_size=n, transformer_only=True))
    pe, pooled = random_embeddings(text=TEXT, dtype=torch.bfloat16)
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, height=SIZE[0], width=SIZE[1], steps=8, seed=5)
    two = parallel.launch(2, run_engine, paths[2], "denoise", kw)
    one = Engine.load(paths[1]).denoise(**kw).cpu()
    assert sqnr_db(two.float(), one.float()) >= 35.0


@pytest.mark.parametrize("how", ["fluxc run --gpus 2", "torchrun"])
def test_cli_runs_a_two_rank_engine_and_rank_0_writes_the_image(pipelines, tmp_path, how):
    """The two launches README gives: fluxc's own (--gpus) and a bare torchrun of the runtime (python -m fluxc.runtime)."""
    import subprocess
    import sys

    from PIL import Image

    out = tmp_path / "cat.png"
    args = [pipelines[2], "--prompt", "a cat", "--steps", "2", "--height", str(SIZE[0]), "--width", str(SIZE[1]),
            "-o", str(out)]
    if how == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "fluxc.runtime", *args]
    else:
        cmd = [sys.executable, "-c", "from fluxc.cli import main; main()", "run", *args, "--gpus", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(out).size == (SIZE[1], SIZE[0]) and not list(tmp_path.glob("*.partial*"))


@pytest.mark.parametrize("kernel", ["copy_heads", "qk_norm_rope", "dequantize_rows"])
def test_e4m3_send_kernels_compile_for_hopper(kernel):
    """The kernels that write e4m3 rows into the send buffer (quantize_heads' and qk_norm_rope's row-e4m3 mode) and
    the one that reads them back, compiled for sm_90a here (Triton bundles ptxas): the fp32 scale stored or loaded
    through a cast of the uint8 row pointer is one 32-bit access, and the cubin is made."""
    triton = pytest.importorskip("triton", reason="Triton is not installed")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fluxc.runtime.ops import kernels

    if kernel == "dequantize_rows":
        fn, pointers, ints = kernels._dequantize_rows_kernel, {"x_ptr": "*u8", "out_ptr": "*bf16"}, ("R",)
        constexprs = {"D": 128, "BLOCK_R": 16}
    elif kernel == "copy_heads":
        fn, pointers = kernels._copy_heads_kernel, {"src_ptr": "*bf16", "dst_ptr": "*u8"}
        ints = ("S", "G2", "G3", "s_b", "s_s", "s_1", "s_2", "s_3", "d_b", "d_s", "d_1", "d_2", "d_3")
        constexprs = {"G": 12, "D": 128, "BLOCK_G": 16, "QUANT": True}
    else:
        fn = kernels._qk_norm_rope_kernel
        pointers = {"q_ptr": "*bf16", "k_ptr": "*bf16", "qw_ptr": "*bf16", "kw_ptr": "*bf16", "qo_ptr": "*u8",
                    "ko_ptr": "*u8", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "q_scale_ptr": "*fp32",
                    "k_scale_ptr": "*fp32"}
        ints = ("S", "row0", "q_sb", "q_ss", "q_sh", "k_sb", "k_ss", "k_sh", "o_sb", "o_ss", "o_1", "o_2", "o_3", "G2",
                "G3", "H")
        constexprs = {"QUANT": kernels.NORM_ROPE_ROW_E4M3, "D": 128, "BLOCK_H": kernels.QK_NORM_ROPE_HEADS}
    signature = {**pointers, **{p: "i32" for p in ints}, **({"eps": "fp32"} if kernel == "qk_norm_rope" else {}),
                 **{p: "constexpr" for p in constexprs}}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 128), options={"num_warps": 4})
    ptx = compiled.asm["ptx"]
    scale_access = "ld.global" if kernel == "dequantize_rows" else "st.global"  # the fp32 scale, 32 bits at once
    assert ".target sm_90a" in ptx and any(f"{scale_access}{w}.b32" in ptx or f"{scale_access}{w}.f32" in ptx
                                           for w in ("", ".v2", ".v4")), ptx[-2000:]
    assert len(compiled.asm["cubin"]) > 1000
