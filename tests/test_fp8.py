"""FP8 (quantize_fp8, recipe sm90_fp8) on the tiny model: counts, SQNR floors, the engine, target checks."""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from fluxc.build import BuildOptions, build
from fluxc.validate import validate
from fluxc.ir import WeightSource
from fluxc.numerics import (FP8_ATTENTION_SEGMENT_SQNR_DB, FP8_LINEAR_SQNR_DB, FP8_SEGMENT_SQNR_DB,
                             REWRITE_TOLERANCE, relative_error, sqnr_db)
from fluxc.runtime.ops.kernels import norm_rope_reference
from fluxc.passes import quantize_fp8
from fluxc.passes.base import PassContext, aten, is_aten
from fluxc.passes.pipeline import run_pipeline
from fluxc.passes.weight_formats import FORMATS
from fluxc.recipes import RECIPES, bf16
from fluxc.runtime.core.bundle import MANIFEST
from fluxc.runtime.core.errors import FluxcError
from fluxc.runtime.core.profile import Profile
from fluxc.frontend.trace import trace_model

from conftest import TINY_TEXT, denoised_sqnr
from test_passes import _tensors
from fluxc.weights import call_graph as _run, engine_weights, one_linear_graph as _one_linear

# Per segment on `tiny`: every block linear is quantized (a double block's fused img/txt QKV, both output
# projections, both MLPs; a single block's QKV, MLP and both halves of its split output projection), the
# whole head and tail are left bf16 by the recipe.
# Each distinct input is quantized once; the AdaLN outputs (into a double block's QKV, a single block's
# QKV and MLP) and the GELU outputs (into the MLP output projections) by the kernels that produce them
# (fluxc.adaln_fp8, fluxc.gelu_fp8).
# The AdaLN modulation GEMM (one fused weight per double block) keeps bf16 math on an e4m3 weight.
GOLDEN = {"head": {"quantized": 0, "inputs": 0, "fused_inputs": 0, "static_inputs": 0, "weight_only": 0, "excluded": 8},
          "double": {"quantized": 8, "inputs": 8, "fused_inputs": 4, "static_inputs": 0, "weight_only": 1, "excluded": 0},
          "single": {"quantized": 4, "inputs": 3, "fused_inputs": 2, "static_inputs": 0, "weight_only": 1, "excluded": 0},
          "tail": {"quantized": 0, "inputs": 0, "fused_inputs": 0, "static_inputs": 0, "weight_only": 0, "excluded": 2}}


@pytest.fixture(scope="module")
def tiny_bf16():
    from fluxc.frontend.models import load_model

    return load_model("tiny", dtype=torch.bfloat16, device=torch.device("cpu"), seed=0)


def _segments(model):
    return trace_model(model, [Profile(144, 112, TINY_TEXT)], torch.device("cpu"), torch.bfloat16)


def _fp8_segments(model, recipe_name: str, **overrides):
    """(segment, its fp8 pipeline result, SQNR of each output against the same segment through the bf16
    pipeline on the same inputs) per segment of the tiny model; overrides: of the recipe's fields."""
    for seg, plain in zip(_segments(model), _segments(model)):
        tensors = _tensors(seg.graph)
        want = _run(run_pipeline(plain.graph, PassContext(bf16(), "cpu", seg.kind)).graph, tensors)
        recipe = dataclasses.replace(RECIPES[recipe_name](), **overrides)
        result = run_pipeline(seg.graph, PassContext(recipe, "cpu", seg.kind))
        yield seg, result, [sqnr_db(got, expected) for got, expected in zip(_run(result.graph, tensors), want)]


def test_quantize_fp8_counts_and_segment_sqnr(tiny_bf16):
    for seg, result, sqnrs in _fp8_segments(tiny_bf16, "sm90_fp8"):
        assert result.counts["quantize_fp8"] == GOLDEN[seg.kind], seg.name
        assert len(result.reports["quantize_fp8"]["quantized"]) == GOLDEN[seg.kind]["quantized"]
        assert min(sqnrs) >= FP8_SEGMENT_SQNR_DB, (seg.name, sqnrs)


def test_fp8_attention_counts_and_segment_sqnr(tiny_bf16):
    """sm90_fp8_attn: each block's attention runs on e4m3 q, k, v, and its output feeds the output projections
    in e4m3 directly; segments against bf16 at the FP8-attention floor."""
    for seg, result, sqnrs in _fp8_segments(tiny_bf16, "sm90_fp8_attn"):
        attention_outputs = {"double": 2, "single": 1}.get(seg.kind, 0)  # to_out + to_add_out; proj_out's half
        assert result.counts["quantize_fp8_attention"] == {"attention": int(attention_outputs > 0)}
        assert result.counts["quantize_fp8"] == {**GOLDEN[seg.kind],
                                                 "fused_inputs": GOLDEN[seg.kind]["fused_inputs"] + attention_outputs}
        ops = {n.target for n in result.graph.graph.nodes}
        assert (torch.ops.fluxc.attention_fp8.default in ops) == (attention_outputs > 0)
        assert min(sqnrs) >= FP8_ATTENTION_SEGMENT_SQNR_DB, (seg.name, sqnrs)


def test_fp8_attention_runs_the_recipes_kernel(tiny_bf16, tmp_path):
    """recipe.fp8_attention_kernel is the kernel argument of every fluxc.attention_fp8 call (what its CUDA
    implementation dispatches on); an unknown kernel, or FlashAttention-3 off Hopper, is refused before any work."""
    for kernel in ("cudnn", "flash3", "auto"):  # auto: cuDNN's on the CPU, where nothing is measured
        recipe = dataclasses.replace(RECIPES["sm90_fp8_attn"](), fp8_attention_kernel=kernel)
        for seg in _segments(tiny_bf16):
            result = run_pipeline(seg.graph, PassContext(recipe, "cpu", seg.kind))
            calls = [n for n in result.graph.graph.nodes if n.target is torch.ops.fluxc.attention_fp8.default]
            want = "cudnn" if kernel == "auto" else kernel
            assert [n.args[7] for n in calls] == [want] * (seg.kind in ("double", "single")), seg.name
            report = result.reports.get("quantize_fp8_attention")
            assert report == ({"kernel": "cudnn", "measured_ms": {}} if kernel == "auto" and calls else None)
    options = dict(model="tiny", output=str(tmp_path / "e.fluxe"), precision="fp8", recipe="sm90_fp8_attn")
    with pytest.raises(FluxcError, match="fp8_attention_kernel 'flash4'"):
        validate(BuildOptions(**options, recipe_overrides=(("fp8_attention_kernel", "flash4"),)))
    with pytest.raises(FluxcError, match="FlashAttention-3.*sm_90"):
        validate(BuildOptions(**options, target="sm_100", recipe_overrides=(("fp8_attention_kernel", "flash3"),)))
    assert not (tmp_path / "e.fluxe").exists()


def test_flash3_kernel_that_does_not_import_says_why_and_what_to_do(monkeypatch):
    """An engine built with fp8_attention_kernel 'flash3' on a machine whose FlashAttention-3 is missing, or is
    installed and fails to load (a wheel built for another torch), stops with the import's own error and the remedy."""
    from fluxc.runtime.ops import kernels

    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # None there: `import` raises ImportError
    q = torch.zeros(1, 2, 8, 128).to(torch.float8_e4m3fn)
    one = torch.ones(1, 1, 1, 1)
    why = r"does not import \(import of flash_attn_interface halted.*fp8_attention_kernel 'cudnn'"
    with pytest.raises(FluxcError, match=why):
        kernels._flash3_fp8_attention(q, q, q, one, one, 128 ** -0.5)


def test_output_projections_after_fp8_attention_read_its_one_scale(tiny_bf16):
    """sm90_fp8_attn_epilogues: the output projections' GEMMs read the e4m3 attention output with its one scale
    (v's, [1, 1]) as it is, not a copy of it per token; the segments keep the FP8-attention floor."""
    for seg, result, sqnrs in _fp8_segments(tiny_bf16, "sm90_fp8_attn_epilogues"):
        nodes = result.graph.graph.nodes
        one_scale = [s for n in nodes if n.target is torch.ops.fluxc.fp8_linear_gate_residual.default
                     for s in n.args[1::7] if tuple(s.meta["val"].shape) == (1, 1)]  # a_scale, and a lead's a0_scale
        assert len(one_scale) == {"double": 2, "single": 1}.get(seg.kind, 0), seg.name  # to_out, to_add_out; proj_out
        assert not any(is_aten(n, aten.expand.default) for n in nodes), seg.name
        assert min(sqnrs) >= FP8_ATTENTION_SEGMENT_SQNR_DB, (seg.name, sqnrs)


def test_joined_output_projection_is_one_gemm_with_the_same_result(tiny_bf16):
    """fp8_epilogues "joined" (the *_epilogues recipes'): a single block's output projection, its attention half
    (e4m3 on v's one scale) and its MLP half (per token), is one fused GEMM whose K loop runs both, not two chained
    ones; the double blocks' four are unchanged. Its segment computes what the two-GEMM one does, within the bf16
    rewrite tolerance (one rounding of the sum where the chain rounds each half's gated residual), at
    sm90_fp8_attn's floor."""
    assert "joined" in RECIPES["sm90_fp8_attn_epilogues"]().fp8_epilogues
    chained = _fp8_segments(tiny_bf16, "sm90_fp8_attn_epilogues", fp8_epilogues=("gate_residual", "plain"))
    for (seg, result, sqnrs), (_, two, _), traced in zip(_fp8_segments(tiny_bf16, "sm90_fp8_attn_epilogues"),
                                                         chained, _segments(tiny_bf16)):
        fused = [n for n in result.graph.graph.nodes if n.target is torch.ops.fluxc.fp8_linear_gate_residual.default]
        leads = [n for n in fused if len(n.args) > 7]
        assert (len(fused), len(leads)) == {"double": (4, 0), "single": (1, 1)}.get(seg.kind, (0, 0)), seg.name
        if leads:  # the lead is the attention half, on v's one scale; the bias stays with the MLP half
            assert tuple(leads[0].args[8].meta["val"].shape) == (1, 1) and leads[0].args[4] is not None
        tensors = _tensors(traced.graph)  # the inputs _fp8_segments ran both on
        for got, want in zip(_run(result.graph, tensors), _run(two.graph, tensors)):
            assert relative_error(got, want) <= REWRITE_TOLERANCE[torch.bfloat16], seg.name
        assert min(sqnrs) >= FP8_ATTENTION_SEGMENT_SQNR_DB, (seg.name, sqnrs)


def test_rms_fp8_scale_bounds_normed_rotated_rows():
    """The static q/k scale (sqrt(D) max|w| / 448) holds every RMSNorm + rotary output below e4m3's 448, and is
    nearly tight: a one-hot row puts all of its norm on one element."""
    g = torch.Generator().manual_seed(0)
    h, d = 4, 128
    weights = [(torch.rand(d, generator=g) * 2 - 1).to(torch.bfloat16) for _ in range(2)]
    one_hot = torch.zeros(1, d, h, d)
    for i in range(d):
        one_hot[0, i, :, i] = 1.0
    parts = [torch.cat([one_hot, torch.randn(1, 64, h, d, generator=g) * 50], 1).to(torch.bfloat16) for _ in weights]
    angles = torch.rand(2 * (d + 64), d // 2, generator=g).repeat_interleave(2, dim=1) * 6.3
    scale = WeightSource("s", "rms_fp8_scale", (WeightSource("a"), WeightSource("b"))).make(
        dict(zip("ab", weights)), FORMATS)
    y = norm_rope_reference(parts, weights, angles.cos(), angles.sin(), 1e-6)
    ratio = float(y.float().abs().max() / (scale * 448))
    assert 0.95 < ratio <= 1.0, ratio


def block_linears(model):
    """(segment kind, name, weight, bias, a random bf16 input [37, K]) for each linear of the first double and
    the first single block, the inputs from one seeded generator."""
    blocks = {"double": model.module.transformer_blocks[0], "single": model.module.single_transformer_blocks[0]}
    g = torch.Generator().manual_seed(0)
    for kind, block in blocks.items():
        for name, linear in block.named_modules():
            if isinstance(linear, torch.nn.Linear):
                w, b = linear.weight.detach(), linear.bias.detach()
                yield kind, name, w, b, torch.randn(37, w.shape[1], generator=g).to(torch.bfloat16)


def test_every_block_linear_meets_the_fp8_floor(tiny_bf16):
    """Each linear of a double and a single block, quantized alone, against float64 math on its real weight
    (the AdaLN modulation GEMMs weight-only, as the recipe says)."""
    checked = 0
    for kind, name, w, b, x in block_linears(tiny_bf16):
        result = quantize_fp8.run(_one_linear(w, b, 37, name), PassContext(RECIPES["sm90_fp8"](), "cpu", kind))
        full = "norm" not in name
        assert result.counts == {"quantized": int(full), "inputs": int(full), "fused_inputs": 0, "static_inputs": 0,
                                 "weight_only": int(not full), "excluded": 0}, name
        made = [n.meta["weight"].op for n in result.graph.graph.nodes if "weight" in n.meta]
        assert sorted(made) == ["fp8", "fp8_scale", "load"], (name, made)  # e4m3 weight, its scales, bias
        (got,) = _run(result.graph, {f"{name}.weight": w, f"{name}.bias": b, "x_1": x})
        want = x.double() @ w.double().t() + b.double()
        assert sqnr_db(got, want) >= FP8_LINEAR_SQNR_DB, (kind, name, sqnr_db(got, want))
        checked += 1
    # double: q, k, v, out, added q, k, v, out, 2 + 2 MLP, 2 modulations; single: q, k, v, MLP, out, modulation
    assert checked == 14 + 6


# What the tiny fp8 engines' 8-step latents hold against the bf16 engine's: measured 32.5 dB (per token) and
# 32.4 dB (calibrated) on the CPU; numerics.FP8_SEGMENT_SQNR_DB (20 dB) is the full model's per-segment floor and
# would let a 10 dB regression of the tiny engine pass.
TINY_FP8_ENGINE_SQNR_DB = 30.0


def test_a_build_frees_each_layers_bf16_weights_once_their_fp8_forms_are_made(tiny_bf16):
    """A build hands engine_weights the checkpoint, which holds the only references to the transformer's tensors
    (release=True): when a layer's weights are made, no earlier layer's checkpoint tensor is still held, and every
    tensor the engine does not carry as it is has been freed at the end. The build's peak is then the checkpoint,
    not the checkpoint plus every fp8 copy (FLUX.2-dev: 64 GB, not 96). The weights equal those made without."""
    import weakref

    segments = _segments(tiny_bf16)
    for seg in segments:
        seg.graph = run_pipeline(seg.graph, PassContext(RECIPES["sm90_fp8"](), "cpu", seg.kind)).graph
    expected = engine_weights(segments, dict(tiny_bf16.module.state_dict()))
    layers = [f"{layer}." for layer in dict.fromkeys(layer for seg in segments for layer in seg.layers) if layer]
    assert len(layers) == 4  # tiny: 2 double + 2 single blocks

    def layer_of(key):
        return next((p for p in layers if key.startswith(p)), None)

    class Watched(dict):
        """The checkpoint: at each read of a layer's tensor, the layers whose tensors it still holds."""
        reads = []

        def __getitem__(self, key):
            self.reads.append((layer_of(key), {layer_of(k) for k in self} - {None}))
            return super().__getitem__(key)

    checkpoint = Watched({k: v.clone() for k, v in tiny_bf16.module.state_dict().items()})
    alive = {k: weakref.ref(v) for k, v in checkpoint.items()}
    got = engine_weights(segments, checkpoint, release=True)

    order = list(dict.fromkeys(layer for layer, _ in Watched.reads if layer))
    assert sorted(order) == sorted(layers)
    for layer, held in Watched.reads:
        if layer:
            assert held == set(order[order.index(layer):]), (layer, held)
    carried = {t.untyped_storage().data_ptr() for t in got.values()}
    for key, ref in alive.items():
        if layer_of(key):
            assert key not in checkpoint
            assert ref() is None or ref().untyped_storage().data_ptr() in carried, key
    assert got.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name


@pytest.fixture(scope="module")
def tiny_engines(tmp_path_factory):
    """Tiny CPU transformer-only engines in bf16, fp8, and fp8 with static scales from 2 calibration samples
    (same weights, one profile)."""
    paths = {name: str(tmp_path_factory.mktemp("engines") / f"tiny-{name}.fluxe")
             for name in ("bf16", "fp8", "fp8-calibrated")}
    for name, precision, calibrate in (("bf16", "bf16", 0), ("fp8-calibrated", "fp8", 2)):
        build(BuildOptions(model="tiny", output=paths[name], target="cpu", precision=precision, calibrate=calibrate,
                           resolutions=((144, 112),), text_tokens=TINY_TEXT, transformer_only=True))
    # the fp8 engine as a user types it: the recipe implies its precision
    from click.testing import CliRunner

    from fluxc.cli import main

    result = CliRunner().invoke(main, ["build", "--model", "tiny", "--target", "cpu", "--recipe", "sm90_fp8",
                                       "--resolution", "144x112", "--text-tokens", str(TINY_TEXT), "--transformer-only",
                                       "-o", paths["fp8"]])
    assert result.exit_code == 0, result.output
    return paths


def test_fp8_engine_lists_its_layers_and_denoises_close_to_bf16(tiny_engines):
    """End to end: 8 denoising steps of the fp8 engine against the bf16 engine's, from the same noise."""
    m = json.load(open(os.path.join(tiny_engines["fp8"], MANIFEST)))
    assert m["precision"] == "fp8" and m["recipe"]["name"] == "sm90_fp8"
    double = m["pass_reports"]["double-144x112"]["quantize_fp8"]
    assert "attn.to_out.0.weight" in double["quantized"]
    assert double["weight_only"] == ["cat0(norm1.linear.weight,norm1_context.linear.weight)"]
    schedule = next(s for s in m["segments"] if s["kind"] == "double_schedule")
    assert "fp8(cat0(norm1.linear.weight,norm1_context.linear.weight))" in schedule["weights"]
    assert double["excluded"] == [] and m["pass_reports"]["tail-144x112"]["quantize_fp8"]["excluded"]
    sqnr = denoised_sqnr(tiny_engines["fp8"], tiny_engines["bf16"])
    print(f"tiny fp8 engine, 8-step latents against the bf16 engine: {sqnr:.1f} dB")  # 34.5 dB when written; 32.4 with weight-only modulation
    assert sqnr >= TINY_FP8_ENGINE_SQNR_DB


def test_fp8_below_sm89_is_refused(tmp_path):
    with pytest.raises(FluxcError, match="sm_89"):
        validate(BuildOptions(model="tiny", output=str(tmp_path / "e.fluxe"), target="sm_80", precision="fp8"))


def test_fp8_attention_below_sm90_is_refused(tmp_path):
    with pytest.raises(FluxcError, match="sm_90"):
        validate(BuildOptions(model="tiny", output=str(tmp_path / "e.fluxe"), target="sm_89", precision="fp8",
                              recipe="sm90_fp8_attn"))


def test_calibrated_fp8_engine_stores_static_scales_and_denoises_close_to_bf16(tiny_engines):
    """--calibrate: every block linear's input on a static scale stored per layer (no per-token scales at run
    time), and the engine's 8-step latents at the fp8 floor against the bf16 engine's."""
    from safetensors.torch import load_file

    from fluxc.runtime.core.bundle import WEIGHTS

    m = json.load(open(os.path.join(tiny_engines["fp8-calibrated"], MANIFEST)))
    assert m["calibration"]["samples"] == 2 and "random prompt embeddings" in m["calibration"]["how"]
    for kind in ("double", "single"):
        counts = m["pass_counts"][f"{kind}-144x112"]["quantize_fp8"]
        assert counts["static_inputs"] == counts["inputs"] == GOLDEN[kind]["inputs"] and counts["fused_inputs"] == 0
    weights = load_file(os.path.join(tiny_engines["fp8-calibrated"], WEIGHTS))
    qkv = [weights[f"transformer_blocks.{i}.act_scale(cat0(attn.to_q.weight,attn.to_k.weight,attn.to_v.weight))"]
           for i in range(2)]
    assert all(s.shape == (1, 1) and s.item() > 0 for s in qkv) and qkv[0].item() != qkv[1].item()  # per layer
    sqnr = denoised_sqnr(tiny_engines["fp8-calibrated"], tiny_engines["bf16"])
    print(f"tiny calibrated fp8 engine, 8-step latents against the bf16 engine: {sqnr:.1f} dB")
    assert sqnr >= TINY_FP8_ENGINE_SQNR_DB


def test_calibrate_needs_fp8(tmp_path):
    with pytest.raises(FluxcError, match="--calibrate"):
        validate(BuildOptions(model="tiny", output=str(tmp_path / "e.fluxe"), target="cpu", precision="bf16",
                              calibrate=4))


@pytest.mark.parametrize("epilogues, gelus, scaled_mms", [(None, (0, 0), (0, 0)), (("gate_residual",), (0, 0), (4, 2)),
                                                          (("gate_residual", "gelu"), (2, 1), (2, 1))])
def test_fp8_epilogues_fuse_the_gated_residuals_and_gelus_and_keep_the_floor(tiny_engines, tmp_path, epilogues,
                                                                             gelus, scaled_mms):
    """Recipe sm90_fp8_epilogues (passes/fuse_fp8_epilogues.py): every output projection's gated residual goes into
    its FP8 GEMM, and with fp8_epilogues "gelu" every MLP GELU too (golden counts on tiny: a double block's 4 and 2,
    a single block's 1 and 1; the GEMMs left as _scaled_mm: QKV, and without "gelu" the MLP up-projections; with
    "plain", the recipe's default, those run as fluxc.fp8_linear, none left), and the engine's latents keep the fp8
    engine's floor against bf16, within 0.5 dB of the unfused fp8 engine (1x128 block scales on the GELU output
    instead of per-token ones)."""
    path = str(tmp_path / "tiny-fp8-epilogues.fluxe")
    overrides = (("fp8_epilogues", epilogues),) if epilogues else ()
    build(BuildOptions(model="tiny", output=path, target="cpu", recipe="sm90_fp8_epilogues", resolutions=((144, 112),),
                       text_tokens=TINY_TEXT, transformer_only=True, recipe_overrides=overrides))
    m = json.load(open(os.path.join(path, MANIFEST)))
    plain = "plain" in (epilogues or RECIPES["sm90_fp8_epilogues"]().fp8_epilogues)
    counts = {kind: m["pass_counts"][f"{kind}-144x112"]["fuse_fp8_epilogues"] for kind in ("double", "single")}
    assert counts["double"] == {"gate_residual": 4, "gelu": gelus[0]} | ({"plain": 4} if plain else {})
    assert counts["single"] == {"gate_residual": 1, "gelu": gelus[1]} | ({"plain": 2} if plain else {})
    # the GEMM writes each gated residual, so fuse_adaln also takes the double block's two norm2s (their e4m3
    # through adaln_fp8, as the norm1s)
    adaln = {kind: m["pass_counts"][f"{kind}-144x112"]["fuse_adaln"]["fused"] for kind in ("double", "single")}
    assert adaln == {"double": 4, "single": 1}
    ops = {s["kind"]: s["op_counts"] for s in m["segments"] if s["kind"] in ("double", "single")}
    assert tuple(ops[k].get("aten._scaled_mm.default", 0) for k in ("double", "single")) == scaled_mms
    sqnr = denoised_sqnr(path, tiny_engines["bf16"])
    unfused = denoised_sqnr(tiny_engines["fp8"], tiny_engines["bf16"])
    print(f"tiny fp8 engine with GEMM epilogues, 8-step latents against bf16: {sqnr:.1f} dB (unfused {unfused:.1f})")
    assert sqnr >= TINY_FP8_ENGINE_SQNR_DB and sqnr >= unfused - 0.5


@pytest.mark.parametrize("options, words", [(dict(calibrate=2), "--calibrate makes static"),
                                            (dict(backend="onnx"), "--backend onnx does not export"),
                                            (dict(recipe_overrides=(("fp8_epilogues", ("gelu",)),)),
                                             "which need 'gate_residual'"),
                                            (dict(recipe_overrides=(("fp8_epilogues", ("joined", "plain")),)),
                                             "which need 'gate_residual'")])
def test_fp8_epilogues_refuse_static_scales_and_onnx(tmp_path, options, words):
    with pytest.raises(FluxcError, match=words):
        build(BuildOptions(model="tiny", output=str(tmp_path / "x.fluxe"), target="cpu", recipe="sm90_fp8_epilogues",
                           resolutions=((144, 112),), text_tokens=TINY_TEXT, transformer_only=True, **options))
    assert not (tmp_path / "x.fluxe").exists()


FP8_ROWS_INTERPRETED = r"""
import torch
from fluxc.numerics import sqnr_db
from fluxc.runtime.ops import kernels as K

def check(got, want, exact, name):
    # the interpreter (Triton 3.9) truncates where the GPU rounds, to bf16 (twice in adaln: the scale within two bf16
    # ulps) and to e4m3 (~23 dB where rounding gives ~31), as it did before gelu_fp8 held its output in bf16
    (q, scale), (_, want_scale) = got, want
    assert torch.allclose(scale, want_scale, rtol=2 ** -6, atol=0), (name, (scale / want_scale - 1).abs().max())
    assert sqnr_db(q.float() * scale, exact) >= 20, (name, sqnr_db(q.float() * scale, exact))

g = torch.Generator().manual_seed(0)
x = (torch.randn(3, 12288, generator=g) * 2).to(torch.bfloat16)  # as launched: 3 chunks of 4096 in a block of 4
x[1] = -4 - torch.rand(x.shape[1], generator=g)  # GELU ~ -1e-4: a masked lane that were not 0 would set the scale
out, scale = torch.empty(x.shape, dtype=torch.float8_e4m3fn), torch.empty(3, 1)
chunks, chunk = K.gelu_fp8_chunks(x.shape[1])
K._gelu_fp8_kernel[(3,)](x, out, scale, x.shape[1], CHUNKS=chunks, CHUNK=chunk, num_warps=K.GELU_FP8_WARPS)
check((out, scale), K.gelu_fp8(x), torch.nn.functional.gelu(x.double(), approximate="tanh"), "gelu_fp8")
b, s, c = 2, 3, 3072 - 256
x = (torch.randn(b, s, c, generator=g) * 3 + 1).to(torch.bfloat16)
mod = torch.randn(b, 6 * c, generator=g).to(torch.bfloat16)
scale, shift = mod[:, c:2 * c], mod[:, 4 * c:5 * c]
out, row_scale = torch.empty(x.shape, dtype=torch.float8_e4m3fn), torch.empty(b, s, 1)
K._adaln_kernel[(b * s,)](x, scale.contiguous(), shift.contiguous(), out, row_scale, s, c, c, c, 1e-6, QUANT=True,
                          BLOCK_C=4096, num_warps=K.ADALN_WARPS)
check((out, row_scale), K.adaln_fp8(x, scale, shift, 1e-6), K.adaln(x, scale, shift, 1e-6).double(), "adaln_fp8")
"""


def test_fp8_row_kernels_in_the_interpreter_match_their_references():
    """gelu_fp8's and adaln_fp8's Triton kernels (per-token e4m3 in the producing kernel), run on the CPU by Triton's
    interpreter (a fresh process: TRITON_INTERPRET=1 before the kernels are defined) at rows narrower than their
    power-of-two blocks, against the ops' CPU references. gelu_fp8 takes its row amax without a mask, so its masked
    chunk must hold 0 (loaded as 0, mapped to 0): one that did not would move the scale of the row of small values.
    tests/test_gpu.py holds the compiled kernels to rounding."""
    pytest.importorskip("triton", reason="Triton is not installed")
    done = subprocess.run([sys.executable, "-c", FP8_ROWS_INTERPRETED], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert done.returncode == 0, done.stderr[-3000:]


def test_gelu_fp8_kernel_holds_two_rows_an_sm_on_hopper():
    """gelu_fp8's kernel compiled for sm_90a as it is launched at FLUX's 12288-wide rows (3 chunks of 4096 in a
    block of 4, GELU_FP8_WARPS): no local memory, and few enough registers (cuobjdump, bundled with Triton, reads
    the cubin) that two programs, two rows in flight, fit an SM's 64K. As one 16384-lane block masked per lane it
    took ~100 at 16 warps, one row an SM: ~2.2 TB/s in the H200 step, half its copy bandwidth."""
    triton = pytest.importorskip("triton", reason="Triton is not installed")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fluxc.runtime.ops import kernels

    signature = {"x_ptr": "*bf16", "out_ptr": "*fp8e4nv", "row_scale_ptr": "*fp32", "N": "i32",
                 "CHUNKS": "constexpr", "CHUNK": "constexpr"}
    chunks, chunk = kernels.gelu_fp8_chunks(12288)
    assert (chunks, chunk) == (4, 4096)
    constexprs = {"CHUNKS": chunks, "CHUNK": chunk}
    compiled = triton.compile(ASTSource(fn=kernels._gelu_fp8_kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 128), options={"num_warps": kernels.GELU_FP8_WARPS})
    cubin = os.path.join(tempfile.gettempdir(), f"gelu_fp8_{os.getpid()}.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    try:
        usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(cubin)
    fields = dict(f.split(":", 1) for f in usage.split("_gelu_fp8_kernel:")[1].split())
    assert int(fields["REG"]) * 32 * kernels.GELU_FP8_WARPS * 2 <= 65536 and fields["LOCAL"] == "0", usage
