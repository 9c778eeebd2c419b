"""GPU checks of the tiny engine (run on the lab GPU by scripts/gpu_tests.sh; skipped without CUDA)."""

import pytest
import torch

from conftest import random_embeddings
from fluxc.numerics import sqnr_db
from fluxc.frontend.components import diffusers_pipeline

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny_bf16_path(tmp_path_factory):
    """The whole tiny pipeline (random weights, seed 0) as a bf16 engine for this GPU."""
    from fluxc.build import BuildOptions, build

    path = str(tmp_path_factory.mktemp("gpu") / "tiny-bf16.fluxe")
    build(BuildOptions(model="tiny", output=path, precision="bf16", resolutions=((144, 112),), text_tokens=13))
    return path


@pytest.fixture(scope="module")
def tiny_bf16_cuda(tiny_bf16_path):
    from fluxc.runtime import Engine

    return Engine.load(tiny_bf16_path)


@pytest.fixture(scope="module")
def tiny_bf16_reference():
    """diffusers' FluxPipeline over the same random components, bf16 on the GPU."""
    from fluxc.frontend.components import load_components
    from fluxc.frontend.models import load_model

    cuda = torch.device("cuda")
    return diffusers_pipeline(load_model("tiny", dtype=torch.bfloat16, device=cuda, seed=0).module,
                              load_components("tiny", "flux1", dtype=torch.bfloat16, device=cuda, seed=0))


def test_cudnn_attention_selected_on_hopper(tiny_bf16_cuda):
    """select_attention rewrites the one attention of every double and single block segment."""
    counts = tiny_bf16_cuda.manifest["pass_counts"]
    if int(tiny_bf16_cuda.manifest["target"]["sm"].removeprefix("sm_")) < 90:
        pytest.skip("cuDNN attention is selected on sm_90 and later")
    traced = {s["name"]: {op: n for op, n in s["op_counts"].items() if "attention" in op}
              for s in tiny_bf16_cuda.manifest["segments"]}
    assert {k: v["select_attention"]["cudnn"] for k, v in counts.items() if k.split("-")[0] in ("double", "single")} \
        == {"double-144x112": 1, "single-144x112": 1}, traced
    assert counts["head-144x112"]["select_attention"]["cudnn"] == 0


def test_graphed_loop_equals_eager_loop_on_gpu(tiny_bf16_cuda):
    """The CUDA-graphed step replays exactly what the eager step computes."""
    emb = random_embeddings(dtype=torch.bfloat16)
    graphed = tiny_bf16_cuda.denoise(*emb, height=144, width=112, steps=6, seed=3)
    eager = tiny_bf16_cuda.denoise(*emb, height=144, width=112, steps=6, seed=3, cuda_graph=False)
    assert torch.equal(graphed, eager)
    again = tiny_bf16_cuda.denoise(*emb, height=144, width=112, steps=6, seed=3)  # graph reuse
    assert torch.equal(graphed, again)


@pytest.mark.parametrize("policy, threshold", [("fbcache", 0.6), ("teacache", 1.0)])
def test_cached_graphed_loop_equals_cached_eager_loop_on_gpu(tiny_bf16_cuda, policy, threshold):
    """The cached step's CUDA graph (head + decision, then rest or reuse as conditional nodes) replays what the
    eager pieces compute, with the same decisions, and a step runs without a host sync; threshold 0 skips
    nothing and equals the plain graphed loop."""
    from fluxc.runtime.core.cache_config import CacheConfig
    from fluxc.runtime.loop import conditional_nodes

    emb = random_embeddings(dtype=torch.bfloat16)
    run = dict(height=144, width=112, steps=8, seed=3)
    reports = [{}, {}, {}]
    config = CacheConfig(policy, threshold)
    graphed = tiny_bf16_cuda.denoise(*emb, **run, cache_config=config, report=reports[0])
    eager = tiny_bf16_cuda.denoise(*emb, **run, cache_config=config, report=reports[1], cuda_graph=False)
    again = tiny_bf16_cuda.denoise(*emb, **run, cache_config=config, report=reports[2])  # graph reuse
    assert reports[0]["cache"]["skipped_steps"] == reports[1]["cache"]["skipped_steps"] == \
        reports[2]["cache"]["skipped_steps"]
    assert 0 < len(reports[0]["cache"]["skipped_steps"]) < 7
    assert torch.equal(graphed, eager) and torch.equal(graphed, again)
    step = tiny_bf16_cuda._graphs[tiny_bf16_cuda.graph_key(tiny_bf16_cuda.profile_for(144, 112), config)]
    assert step.branched == conditional_nodes() and len(step.graphs) == (1 if step.branched else 3)
    if step.branched:
        torch.cuda.set_sync_debug_mode("error")  # a host read of the flag would raise
        try:
            step.run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    plain = tiny_bf16_cuda.denoise(*emb, **run)
    assert torch.equal(tiny_bf16_cuda.denoise(*emb, **run, cache_config=CacheConfig(policy, 0.0)), plain)


def test_bf16_engine_matches_diffusers_pipeline_on_gpu(tiny_bf16_cuda):
    from fluxc.frontend.models import load_model
    from fluxc.numerics import assert_close_report

    model = load_model("tiny", dtype=torch.bfloat16, device=torch.device("cuda"), seed=0).module
    pipe = diffusers_pipeline(model)
    pe, pooled = (t.cuda() for t in random_embeddings(dtype=torch.bfloat16))
    ref = pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, height=144, width=112, num_inference_steps=8,
               guidance_scale=3.5, generator=torch.Generator().manual_seed(5), output_type="latent").images
    got = tiny_bf16_cuda.denoise(pe, pooled, height=144, width=112, steps=8, guidance=3.5, seed=5)
    assert_close_report(got.float(), ref.float(), name="bf16 latents after 8 steps", rtol=3e-2)


def test_bf16_pipeline_image_matches_diffusers_on_gpu(tiny_bf16_cuda, tiny_bf16_reference):
    from fluxc.numerics import assert_close_report

    prompt = "a photo of a cat sitting on a red chair"
    ref = tiny_bf16_reference(prompt, height=144, width=112, num_inference_steps=8, guidance_scale=3.5,
                              max_sequence_length=13, generator=torch.Generator().manual_seed(4), output_type="pt").images
    got = tiny_bf16_cuda.generate(prompt, steps=8, guidance=3.5, seed=4, output_type="pt")
    assert_close_report(got, ref.permute(0, 2, 3, 1).float().cpu(), name="bf16 image after 8 steps", rtol=3e-2)


def test_encoder_placements_on_gpu(tiny_bf16_path, tiny_bf16_cuda, tmp_path):
    """offload parks the encoder weights in CPU memory and gives the same image; cpu runs them there."""
    from fluxc.build import BuildOptions, build
    from fluxc.numerics import assert_close_report
    from fluxc.runtime import Engine

    args = dict(steps=4, seed=9, output_type="pt")
    resident = tiny_bf16_cuda.generate("the moon at night", **args)
    offload = Engine.load(tiny_bf16_path, encoders="offload")
    assert all(t.device.type == "cpu" and t.is_pinned() for t in offload._weights["t5:text_encoder_2"])
    assert torch.equal(offload.generate("the moon at night", **args), resident)
    assert all(t.device.type == "cpu" for t in offload._weights["t5:text_encoder_2"])  # GPU copies dropped
    cpu_path = str(tmp_path / "tiny-cpu-encoders.fluxe")
    build(BuildOptions(model="tiny", output=cpu_path, precision="bf16", resolutions=((144, 112),), text_tokens=13,
                       encoders="cpu"))
    on_cpu = Engine.load(cpu_path).generate("the moon at night", **args)
    assert_close_report(on_cpu, resident, name="image with CPU-compiled encoders", rtol=3e-2)


def test_fusions_fire_on_gpu(tiny_bf16_cuda):
    """The fusion passes match the CUDA trace (fused RMSNorm, cuDNN attention) as they match the CPU one."""
    counts = tiny_bf16_cuda.manifest["pass_counts"]
    assert counts["double-144x112"]["fuse_qk_norm_rope"] == {"fused": 1}
    assert counts["single-144x112"]["fuse_qk_norm_rope"] == {"fused": 1}
    assert counts["double-144x112"]["fuse_epilogues"] == {"bias_gelu": 2, "split_concat": 0}
    assert counts["single-144x112"]["fuse_epilogues"] == {"bias_gelu": 1, "split_concat": 1}
    assert counts["single-144x112"]["fuse_qkv"] == {"groups": 1, "linears": 3}


@pytest.mark.parametrize("heads_per_program", [4, 2])
def test_qk_norm_rope_kernel_matches_its_reference(monkeypatch, heads_per_program):
    """The Triton kernel against the op's reference implementation on the CPU, on strided
    q/k column slices of one fused projection output and two joined parts, as a double block feeds it; with a
    token's 3 heads in one program (its last row masked), or over 2 programs (QK_NORM_ROPE_HEADS = 2)."""
    from fluxc.runtime.ops import kernels

    monkeypatch.setattr(kernels, "QK_NORM_ROPE_HEADS", heads_per_program)
    g = torch.Generator().manual_seed(0)
    b, t, s, h, d = 2, 7, 37, 3, 128
    qkv = [torch.randn(b, n, 3, h, d, generator=g).to(torch.bfloat16) for n in (t, s)]  # [B, S, 3, H, D]
    q_parts, k_parts = [x[:, :, 0] for x in qkv], [x[:, :, 1] for x in qkv]
    weights = [(torch.rand(d, generator=g) + 0.5).to(torch.bfloat16) for _ in range(4)]
    angles = torch.randn(t + s, d // 2, generator=g).repeat_interleave(2, dim=1)
    args = (weights[:2], weights[2:], angles.cos(), angles.sin(), 1e-6)
    want = torch.ops.fluxc.qk_norm_rope(q_parts, k_parts, *args)
    cuda = lambda xs: [x.cuda() for x in xs]  # noqa: E731
    got = torch.ops.fluxc.qk_norm_rope(cuda(q_parts), cuda(k_parts), cuda(args[0]), cuda(args[1]),
                                       args[2].cuda(), args[3].cuda(), 1e-6)
    for gt, wt in zip(got, want):
        diff = (gt.cpu().float() - wt.float()).abs()
        assert diff.max() <= 2 ** -7 * wt.float().abs().max(), diff.max()  # within one bf16 ulp at the top
        assert (diff == 0).float().mean() > 0.95  # mostly bit-equal: same math, same roundings


def test_qk_norm_rope_kernel_writes_the_ulysses_send_layout():
    """qk_norm_rope_into, the kernel writing [B, S, rank, part, head, D] views of a send buffer (runtime/ops/ulysses.py),
    holds bit for bit what the op's kernel returns, regrouped by torch; batch 2, two parts, 12 heads as 2 ranks x
    2 parts x 3."""
    from fluxc.runtime.ops.kernels import qk_norm_rope_into

    g = torch.Generator().manual_seed(0)
    b, t, s, h, d = 2, 7, 37, 12, 128
    qkv = [torch.randn(b, n, 3, h, d, generator=g).to(torch.bfloat16).cuda() for n in (t, s)]
    q_parts, k_parts = [x[:, :, 0] for x in qkv], [x[:, :, 1] for x in qkv]
    weights = [(torch.rand(d, generator=g) + 0.5).to(torch.bfloat16).cuda() for _ in range(4)]
    angles = torch.randn(t + s, d // 2, generator=g).repeat_interleave(2, dim=1).cuda()
    args = (weights[:2], weights[2:], angles.cos(), angles.sin(), 1e-6)
    want = torch.ops.fluxc.qk_norm_rope(q_parts, k_parts, *args)  # [B, S, H, D]
    send = torch.zeros(2, 2, t + s, b, 3, 3, d, device="cuda", dtype=torch.bfloat16)  # [part, rank, S, B, q|k|v, head, D]
    slots = [send[..., i, :, :].permute(3, 2, 1, 0, 4, 5) for i in range(2)]  # [B, S, rank, part, head, D]
    qk_norm_rope_into(q_parts, k_parts, *args, *slots)
    for slot, w in zip(slots, want):
        assert torch.equal(slot, w.unflatten(2, (2, 2, 3)))
    assert torch.equal(send[..., 2, :, :], torch.zeros_like(send[..., 2, :, :]))  # v's slot untouched
    # e4m3 rows (FP8 engines' transfers): the kernel quantizing as it writes, against quantize_heads of its bf16 rows
    from fluxc.runtime.ops.kernels import quantize_heads

    e4m3 = torch.zeros(2, 2, t + s, b, 3, 3, d + 4, device="cuda", dtype=torch.uint8)
    slots = [e4m3[..., i, :, :].permute(3, 2, 1, 0, 4, 5) for i in range(2)]
    qk_norm_rope_into(q_parts, k_parts, *args, *slots, e4m3=True)
    for slot, w in zip(slots, want):
        ref = torch.zeros_like(slot)
        quantize_heads(ref, w.unflatten(2, (2, 2, 3)))
        assert torch.equal(slot[..., d:], ref[..., d:])  # the scales' bytes
        assert (slot[..., :d] != ref[..., :d]).float().mean() < 0.02  # codes: the same kernel math
    assert not e4m3[..., 2, :, :].any()
    from fluxc.runtime.ops.kernels import dequantize_heads  # the receiving side: its kernel against torch's ops

    landed = e4m3[0].contiguous()
    assert torch.equal(dequantize_heads(landed).cpu(), dequantize_heads(landed.cpu()))


def test_linear_gelu_uses_the_tanh_form_on_gpu():
    """cuBLASLt's GELU epilogue must be the tanh approximation the FLUX MLP uses (fp32, no TF32: the two
    GELU forms differ by up to ~1e-3, far above fp32 GEMM noise)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(256, 64, generator=g), torch.randn(512, 64, generator=g) / 8, torch.randn(512, generator=g)
    got = torch.ops.fluxc.linear_gelu(x.cuda(), w.cuda(), bias.cuda()).cpu()
    pre = x.double() @ w.double().T + bias.double()
    tanh_err = (got.double() - torch.nn.functional.gelu(pre, approximate="tanh")).abs().max()
    exact_err = (got.double() - torch.nn.functional.gelu(pre)).abs().max()
    assert tanh_err < 1e-4 < exact_err, (tanh_err, exact_err)


def test_copy_heads_kernel_moves_what_torchs_copy_moves():
    """kernels.copy_heads against torch's copy on the regroupings runtime/ops/ulysses.py makes (to and from the send
    layout [part, rank, token, batch, q|k|v, head, D]), batch 2, with a strided source (v in the fused QKV)
    and a head count that is not a power of two."""
    from fluxc.runtime.ops.kernels import copy_heads

    n, c, hc, s, b, d = 2, 2, 3, 37, 2, 128
    qkv = torch.randn(b, s, 3 * n * c * hc * d, device="cuda").to(torch.bfloat16)
    v = qkv[..., -n * c * hc * d:].unflatten(2, (n, c, hc, d))  # [B, S, N, C, hc, D], row stride 3x
    send = torch.zeros(c, n, s, b, 3, hc, d, device="cuda", dtype=torch.bfloat16)
    dst = send[..., 2, :, :].permute(3, 2, 1, 0, 4, 5)  # [B, S, N, C, hc, D] view of the send layout
    copy_heads(dst, v)
    want = torch.zeros_like(send)
    want[..., 2, :, :].permute(3, 2, 1, 0, 4, 5).copy_(v)
    assert torch.equal(send, want) and send.abs().sum() > 0
    back = torch.empty(b, s, n, c, hc, d, device="cuda", dtype=torch.bfloat16)
    copy_heads(back, dst)
    assert torch.equal(back, v)


def test_adaln_kernel_matches_its_reference():
    """The Triton AdaLN against the op's reference on the CPU, with scale/shift strided column slices of one
    modulation output (as fuse_qkv leaves them) and a width that is not a power of two."""
    g = torch.Generator().manual_seed(0)
    b, s, c = 2, 37, 3072 - 256
    x = (torch.randn(b, s, c, generator=g) * 3 + 1).to(torch.bfloat16)
    mod = torch.randn(b, 6 * c, generator=g).to(torch.bfloat16)
    scale, shift = mod[:, c:2 * c], mod[:, 4 * c:5 * c]
    want = torch.ops.fluxc.adaln(x, scale, shift, 1e-6).float()
    got = torch.ops.fluxc.adaln(x.cuda(), scale.cuda(), shift.cuda(), 1e-6).cpu().float()
    diff = (got - want).abs()
    assert diff.max() <= 2 ** -7 * want.abs().max(), diff.max()
    assert (diff == 0).float().mean() > 0.9


def _assert_fp8_rows_match(got, want, exact: torch.Tensor):
    """A fused kernel's (e4m3 rows, row scales) against its op's CPU reference: scales within one bf16 ulp of
    the row amax, codes nearly all equal, and the dequantized rows an e4m3's worth (>= 28 dB) from `exact`."""
    (gq, gs), (wq, ws) = (got[0].cpu().float(), got[1].cpu()), (want[0].float(), want[1])
    assert gs.shape == ws.shape and torch.allclose(gs, ws, rtol=2 ** -7, atol=0)
    assert (gq == wq).float().mean() > 0.99
    assert sqnr_db(gq * gs, exact) >= 28, sqnr_db(gq * gs, exact)


def test_adaln_fp8_kernel_matches_its_reference():
    g = torch.Generator().manual_seed(0)
    b, s, c = 2, 37, 3072 - 256
    x = (torch.randn(b, s, c, generator=g) * 3 + 1).to(torch.bfloat16)
    mod = torch.randn(b, 6 * c, generator=g).to(torch.bfloat16)
    scale, shift = mod[:, c:2 * c], mod[:, 4 * c:5 * c]
    want = torch.ops.fluxc.adaln_fp8(x, scale, shift, 1e-6)
    got = torch.ops.fluxc.adaln_fp8(x.cuda(), scale.cuda(), shift.cuda(), 1e-6)
    _assert_fp8_rows_match(got, want, torch.ops.fluxc.adaln(x, scale, shift, 1e-6).float())


def test_gelu_fp8_kernel_matches_its_reference():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(300, 12288 - 128, generator=g) * 2).to(torch.bfloat16)
    want = torch.ops.fluxc.gelu_fp8(x)
    got = torch.ops.fluxc.gelu_fp8(x.cuda())
    _assert_fp8_rows_match(got, want, torch.nn.functional.gelu(x.double(), approximate="tanh"))


@pytest.mark.parametrize("heads_per_program", [4, 2])
def test_qk_norm_rope_fp8_kernel_matches_its_reference(monkeypatch, heads_per_program):
    from fluxc.runtime.ops import kernels

    monkeypatch.setattr(kernels, "QK_NORM_ROPE_HEADS", heads_per_program)
    g = torch.Generator().manual_seed(0)
    b, t, s, h, d = 1, 7, 37, 3, 128
    qkv = [torch.randn(b, n, 3, h, d, generator=g).to(torch.bfloat16) for n in (t, s)]
    q_parts, k_parts = [x[:, :, 0] for x in qkv], [x[:, :, 1] for x in qkv]
    weights = [(torch.rand(d, generator=g) + 0.5).to(torch.bfloat16) for _ in range(4)]
    angles = torch.randn(t + s, d // 2, generator=g).repeat_interleave(2, dim=1)
    scales = [torch.full((1, 1, 1, 1), 1.6 * d ** 0.5 / 448) for _ in range(2)]
    args = (weights[:2], weights[2:], angles.cos(), angles.sin(), 1e-6)
    want = torch.ops.fluxc.qk_norm_rope_fp8(q_parts, k_parts, *args, *scales)
    cuda = lambda xs: [x.cuda() for x in xs]  # noqa: E731
    got = torch.ops.fluxc.qk_norm_rope_fp8(cuda(q_parts), cuda(k_parts), cuda(args[0]), cuda(args[1]),
                                           args[2].cuda(), args[3].cuda(), 1e-6, *cuda(scales))
    for gt, wt in zip(got, want):
        assert (gt.cpu().float() == wt.float()).float().mean() > 0.99


def skip_without_fp8_attention_kernel(kernel: str) -> None:
    """cuDNN's FP8 SDPA needs the cudnn frontend; FlashAttention-3's FP8 forward flash_attn_3 and an sm_90 GPU."""
    from fluxc.runtime.ops.kernels import flash3_available

    if kernel == "flash3" and not flash3_available(torch.device("cuda")):
        pytest.skip("FlashAttention-3 needs the flash_attn_3 package and an sm_90 GPU")
    if kernel != "flash3":
        pytest.importorskip("cudnn")  # "auto" times cuDNN's always


@pytest.mark.parametrize("kernel", ["cudnn", "flash3"])
def test_fp8_attention_kernel_against_float64_and_in_a_cuda_graph(kernel):
    """fluxc.attention_fp8 on each kernel (cuDNN's FP8 SDPA, FlashAttention-3's FP8 forward) against float64 attention
    over the same dequantized inputs, at the stated floor; and captured in a CUDA graph, as the engine's step runs
    it, replaying to the same output."""
    skip_without_fp8_attention_kernel(kernel)
    from fluxc.numerics import FP8_ATTENTION_SQNR_DB
    from fluxc.runtime.ops.kernels import ATTENTION_OUT_HEADROOM

    g = torch.Generator().manual_seed(0)
    b, s, h, d = 1, 333, 3, 128
    scales = [torch.tensor(x).reshape(1, 1, 1, 1).cuda() for x in (1.5 * d ** 0.5 / 448, 1.5 * d ** 0.5 / 448, 4 / 448)]
    q, k, v = ((torch.randn(b, s, h, d, generator=g) * 1.5).clamp(-4, 4).cuda() for _ in range(3))
    q8, k8, v8 = ((t / sc).to(torch.float8_e4m3fn).permute(0, 2, 1, 3) for t, sc in zip((q, k, v), scales))
    run = lambda: torch.ops.fluxc.attention_fp8(q8, k8, v8, *scales, d ** -0.5, kernel)  # noqa: E731
    got = run()
    assert got.dtype == torch.float8_e4m3fn and got.shape == (b, h, s, d) and got.stride() == q8.stride()
    deq = [t.double() * sc.double() for t, sc in zip((q8, k8, v8), scales)]
    want = torch.softmax(deq[0] @ deq[1].transpose(-1, -2) * d ** -0.5, -1) @ deq[2]
    assert sqnr_db(got.double() * scales[2].double() * ATTENTION_OUT_HEADROOM, want) >= FP8_ATTENTION_SQNR_DB
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.view(torch.uint8), got.view(torch.uint8))


@pytest.mark.parametrize("kernel", ["cudnn", "flash3"])
def test_fp8_attention_output_keeps_its_headroom(kernel):
    """Where the kernels' e4m3 probabilities round up, the output passes max |v|: one key at the row's top score and
    1023 whose probability relative to it is 256 e^-2.705 = 17.1 (FlashAttention-3 holds P scaled by 256) and rounds
    to 18, all with the largest v, make FA3's output ~5% above it (~471 in v's e4m3 units, where e4m3 ends at 448
    and torch's cast once gave NaN from 465). Stored over ATTENTION_OUT_HEADROOM it stays finite and unsaturated,
    and dequantizes to within e4m3's rounding of P and of the output of the exact value, 4."""
    skip_without_fp8_attention_kernel(kernel)
    from fluxc.runtime.ops.kernels import ATTENTION_OUT_HEADROOM

    b, s, h, d = 1, 1024, 1, 128
    q_scale, v_scale, one = (torch.full((1, 1, 1, 1), x, device="cuda") for x in (2.705 * d ** 0.5, 4 / 448, 1.0))
    q = torch.zeros(b, s, h, d, device="cuda")
    q[..., 0] = q_scale.item()  # e4m3 code 1
    k = torch.zeros(b, s, h, d, device="cuda")
    k[:, 1:, :, 0] = -1  # scores: 0 for key 0, -2.705 for the others
    v = torch.randn(b, s, h, d, generator=torch.Generator().manual_seed(0)).clamp(-3, 3).cuda()
    v[..., 0] = 4  # every key's v at the tensor's max in channel 0: the exact output there is 4
    q8, k8, v8 = ((t / sc).to(torch.float8_e4m3fn).permute(0, 2, 1, 3)
                  for t, sc in ((q, q_scale), (k, one), (v, v_scale)))
    got = torch.ops.fluxc.attention_fp8(q8, k8, v8, q_scale, one, v_scale, d ** -0.5, kernel).float()
    assert torch.isfinite(got).all() and got.abs().max() < 448
    channel0 = got[..., 0] * v_scale * ATTENTION_OUT_HEADROOM  # P's rounding, then the output's: 2^-4 relative each
    assert ((channel0 - 4).abs() <= 4 * 2 ** -3).all(), (channel0.min(), channel0.max())


@pytest.mark.parametrize("kernel", ["cudnn", "flash3", "auto"])
def test_fp8_attention_engine_denoises_close_to_bf16_on_gpu(tmp_path, kernel):
    """The tiny transformer built with sm90_fp8_attn, on each FP8 attention kernel (auto: the one the build measured
    faster, among those that run here), runs its CUDA-graphed loop near the bf16 engine's."""
    skip_without_fp8_attention_kernel(kernel)
    from fluxc.build import BuildOptions, build
    from fluxc.numerics import FP8_ATTENTION_SEGMENT_SQNR_DB
    from fluxc.runtime import Engine

    paths = {}
    for recipe in ("bf16", "sm90_fp8_attn"):
        paths[recipe] = str(tmp_path / f"{recipe}.fluxe")
        build(BuildOptions(model="tiny", output=paths[recipe], precision="fp8" if "fp8" in recipe else "bf16",
                           recipe=recipe, resolutions=((144, 112),), text_tokens=13, transformer_only=True,
                           recipe_overrides=(("fp8_attention_kernel", kernel),) if "fp8" in recipe else ()))
    manifest = Engine.load(paths["sm90_fp8_attn"]).manifest
    assert manifest["pass_counts"]["double-144x112"]["quantize_fp8_attention"]["attention"] == 1
    assert manifest["recipe"]["fp8_attention_kernel"] == kernel
    if kernel == "auto":
        from fluxc.runtime.ops.kernels import flash3_available

        report = manifest["pass_reports"]["double-144x112"]["quantize_fp8_attention"]
        measured = report["measured_ms"]
        if flash3_available(torch.device("cuda")):
            assert set(measured) == {"cudnn", "flash3"} and report["kernel"] == min(measured, key=measured.get)
        else:
            assert measured == {} and report["kernel"] == "cudnn"
    pe, pooled = (t.cuda() for t in random_embeddings(dtype=torch.bfloat16))
    got, want = (Engine.load(paths[r]).denoise(pe, pooled, height=144, width=112, steps=8, seed=5)
                 for r in ("sm90_fp8_attn", "bf16"))
    sqnr = sqnr_db(got, want)
    print(f"tiny sm90_fp8_attn engine, 8-step latents against bf16 on the GPU: {sqnr:.1f} dB")
    assert sqnr >= FP8_ATTENTION_SEGMENT_SQNR_DB


@pytest.mark.parametrize("batch", [2, 4])
def test_batched_engine_matches_batch_1_on_gpu(tiny_bf16_cuda, tmp_path, batch):
    """bf16 on the GPU: a batched engine's image per prompt and seed, with fewer prompts than its batch and with a
    padded second chunk, within the bf16 image contract (rtol 3e-2) of the batch-1 engine's; CUDA graphs on."""
    from conftest import assert_batches_match
    from fluxc.build import BuildOptions, build
    from fluxc.runtime import Engine

    path = str(tmp_path / f"tiny-bf16-b{batch}.fluxe")
    build(BuildOptions(model="tiny", output=path, precision="bf16", resolutions=((144, 112),), text_tokens=13,
                       batch=batch))
    assert_batches_match(Engine.load(path), tiny_bf16_cuda, rtol=3e-2)


def test_adapter_swaps_keep_the_captured_graphs_on_gpu(tiny_bf16_path, tmp_path):
    """An engine whose CUDA graphs were captured before set_adapters makes the image an engine that had the adapter
    before its first capture makes (the graphs read the same buffers); removal gives back the base image bit for bit."""
    from fluxc.runtime import Engine
    from fluxc.runtime.adapters import engine_linears, write_adapter

    captured = Engine.load(tiny_bf16_path)
    g = torch.Generator().manual_seed(0)
    factors = {m: (torch.randn(4, k, generator=g) / k ** 0.5, torch.randn(n, 4, generator=g) * 0.05)
               for m, (n, k) in engine_linears(captured.manifest).items()}
    adapter = str(tmp_path / "a.fluxa")
    write_adapter(adapter, factors, {"family": "flux1", "source": {"file": "random"}, "ranks": [4],
                                     "linears": len(factors)})
    run = dict(seed=3, steps=4, output_type="pt")
    base = captured.generate("a cat", **run)
    captured.set_adapters([(adapter, 1.0)])
    swapped = captured.generate("a cat", **run)
    fresh = Engine.load(tiny_bf16_path)
    fresh.set_adapters([(adapter, 1.0)])
    assert torch.equal(swapped, fresh.generate("a cat", **run))
    assert not torch.equal(swapped, base)
    captured.set_adapters([])
    assert torch.equal(captured.generate("a cat", **run), base)


def test_weights_read_to_the_gpu_equal_the_file(tiny_bf16_path):
    """Engine.load's pipelined read (bundle.read_to_gpu: pinned buffers, side stream) against safetensors' own
    reader, bit for bit, for every weight of every segment; and with a chunk smaller than most tensors."""
    from safetensors.torch import load_file

    from fluxc.runtime import Engine
    from fluxc.runtime.core.bundle import read_to_gpu

    engine = Engine.load(tiny_bf16_path)
    stored = load_file(f"{tiny_bf16_path}/weights.safetensors")
    checked = 0
    for seg in engine.manifest["segments"]:
        for layer in seg["layers"]:
            prefix = f"{layer}." if layer else ""
            for spec, t in zip(seg["weight_specs"], engine._weights[f"{seg['kind']}:{layer}"]):
                assert torch.equal(t.cpu().view(torch.uint8), stored[prefix + spec["name"]].view(torch.uint8))
                checked += 1
    assert checked > 100
    names = sorted(stored)
    targets = [(n, torch.empty_like(stored[n], device="cuda")) for n in names]
    read_to_gpu(f"{tiny_bf16_path}/weights.safetensors", targets, chunk=4096, slots=3)
    assert all(torch.equal(t.cpu().view(torch.uint8), stored[n].view(torch.uint8)) for n, t in targets)


@pytest.mark.parametrize("loads", ["pointers", "tma"])
@pytest.mark.parametrize("m", [4608, 300])  # a single block's tokens at 1024x1024; a partial tile of rows
def test_fp8_gemm_kernels_match_their_references(m, loads, monkeypatch):
    """The Triton FP8 GEMM (runtime/ops/fp8_gemm.py), each way of loading its tiles, on the GPU against the reference
    ops on the CPU, at FLUX.1-dev's MLP shapes: the fused up-projection's e4m3 blocks and scales, the gated
    down-projection reading them. Only the fp32 accumulation order differs, so the bf16 outputs agree to a few ulps
    and an e4m3 code moves only where its bf16 value did."""
    from test_fp8_gemm import operands

    from fluxc.numerics import relative_error
    from fluxc.runtime.ops import fp8_gemm
    from fluxc.runtime.ops.fp8_gemm import dequantize_activation as dq
    from fluxc.runtime.ops.kernels import quantize_rows

    monkeypatch.setattr(fp8_gemm, "CONFIGS", {k: c._replace(loads=loads) for k, c in fp8_gemm.CONFIGS.items()})
    ops, _ = operands(m, 3072, 12288)
    plain = torch.ops.fluxc.fp8_linear(*(t.cuda() for t in ops))
    assert relative_error(plain.cpu(), torch.ops.fluxc.fp8_linear(*ops)) <= 5e-3  # bf16 values a ulp apart at most
    want_q, want_scale = torch.ops.fluxc.fp8_linear_gelu_fp8(*ops)
    q, q_scale = torch.ops.fluxc.fp8_linear_gelu_fp8(*(t.cuda() for t in ops))
    # a block's scale is its bf16 amax / 448: where the fp32 sums (summed in another order) round to the next bf16
    # value, it moves by one bf16 ulp (2^-8 relative, up to 2^-7 at the bottom of a binade); an H100 run at 1e-3
    # norm-wise failed with 2.5e-3 this way, and one at 2^-7 element-wise failed by 0.3% of that bound, so the bound
    # is two ulps at the bottom of a binade. An e4m3 code (2^-3 steps) follows its bf16 value across a rounding
    # boundary for ~2^-5 of the values that moved: ~1e-2 norm-wise (bench_fp8_gemm: 1.1e-2). A wrong block, scale
    # or tile errs by O(1).
    assert ((q_scale.cpu() - want_scale).abs() <= want_scale * 2 ** -6).all()
    assert relative_error(dq(q, q_scale).cpu(), dq(want_q, want_scale)) <= 3e-2
    g = torch.Generator().manual_seed(1)
    w2q, w2_scale = quantize_rows((torch.randn(3072, 12288, generator=g) / 12288 ** 0.5).bfloat16())
    gate, residual = torch.randn(1, 3072, generator=g).bfloat16(), torch.randn(1, m, 3072, generator=g).bfloat16()
    # the down-projection reading the GELU's blocks, and reading per-token scales (sm90_fp8_epilogues' default);
    # bf16 outputs: where a sum rounds to the neighbouring bf16 value (bench_fp8_gemm: 6e-4 to 3.1e-3 norm-wise)
    for a, a_scale in ((want_q, want_scale), quantize_rows(dq(want_q, want_scale).bfloat16())):
        args = (a, a_scale, w2q, w2_scale, None, gate, residual)
        want = torch.ops.fluxc.fp8_linear_gate_residual(*args)
        got = torch.ops.fluxc.fp8_linear_gate_residual(*(None if t is None else t.cuda() for t in args))
        assert relative_error(got.cpu(), want) <= 5e-3
    if loads == "tma":  # joined (TMA only): a single block's attention half, on one scale, leads the MLP half's loop
        x0 = torch.randn(m, 3072, generator=g)
        one = x0.abs().amax().reshape(1, 1) / 448
        w0q, w0_scale = quantize_rows((torch.randn(3072, 3072, generator=g) / 3072 ** 0.5).bfloat16())
        args = (*quantize_rows(dq(want_q, want_scale).bfloat16()), w2q, w2_scale, ops[4][:3072], gate, residual,
                (x0 / one).to(torch.float8_e4m3fn), one, w0q, w0_scale)
        want = torch.ops.fluxc.fp8_linear_gate_residual(*args)
        got = torch.ops.fluxc.fp8_linear_gate_residual(*(t.cuda() for t in args))
        assert relative_error(got.cpu(), want) <= 5e-3


FRESH_PROCESS_DENOISE = """
import sys, torch
from safetensors.torch import save_file
from triton.runtime.jit import JITFunction
from conftest import random_embeddings
from fluxc.runtime import Engine
from fluxc.runtime.ops import fp8_gemm, kernels

engine = Engine.load(sys.argv[1])
latents = engine.denoise(*(t.cuda() for t in random_embeddings(dtype=torch.bfloat16)), height=144, width=112,
                         steps=8, seed=5)
save_file({"latents": latents.cpu().contiguous()}, sys.argv[2])
# what fluxc's Triton kernels compiled through Triton's own JIT in this process (the kernels a segment carries
# run from Inductor's compiled code and never reach these objects)
for module in (fp8_gemm, kernels):
    for name, fn in vars(module).items():
        if isinstance(fn, JITFunction):
            print("jit", name, sum(len(cache[0]) for cache in fn.device_caches.values()))
"""


def test_fp8_epilogue_engine_carries_its_gemms_and_keeps_the_floor(tmp_path):
    """sm90_fp8_epilogues on the GPU: the tiny engine's 8-step latents against the bf16 engine's keep the CPU
    test's floor (and stay within 0.5 dB of the unfused fp8 engine), and in a fresh process the first denoise after
    Engine.load runs the FP8 GEMM and the other fluxc kernels from the segments: no fluxc Triton JIT function
    compiled anything, in any of the three engines (every fluxc Triton op is a triton_op, compiled into the
    segments at build)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from fluxc.build import BuildOptions, build
    from test_fp8 import TINY_FP8_ENGINE_SQNR_DB

    paths = {}
    for recipe in ("bf16", "sm90_fp8", "sm90_fp8_epilogues"):
        paths[recipe] = str(tmp_path / f"{recipe}.fluxe")
        build(BuildOptions(model="tiny", output=paths[recipe], precision="fp8" if "fp8" in recipe else "bf16",
                           recipe=recipe, resolutions=((144, 112),), text_tokens=13, transformer_only=True))
    latents, compiled = {}, {}
    tests = os.path.dirname(__file__)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    for recipe, path in paths.items():
        out = str(tmp_path / f"{recipe}.safetensors")
        done = subprocess.run([sys.executable, "-c", FRESH_PROCESS_DENOISE, path, out], capture_output=True, text=True,
                              timeout=600, cwd=tests, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        latents[recipe] = load_file(out)["latents"]
        compiled[recipe] = dict(line.split()[1:] for line in done.stdout.splitlines() if line.startswith("jit "))
    fused, unfused = (sqnr_db(latents[r], latents["bf16"]) for r in ("sm90_fp8_epilogues", "sm90_fp8"))
    print(f"tiny fp8 engine with GEMM epilogues on the GPU, 8-step latents against bf16: {fused:.1f} dB "
          f"(unfused {unfused:.1f}); Triton JIT compiles at the first denoise: {compiled}")
    assert fused >= TINY_FP8_ENGINE_SQNR_DB and fused >= unfused - 0.5
    # every fluxc Triton op is a triton_op, so no engine's first denoise compiles any of fluxc's kernels
    assert all(n == "0" for counts in compiled.values() for n in counts.values()), compiled
