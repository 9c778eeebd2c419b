"""NVFP4 engines on the tiny model: pass counts, per-layer and per-segment SQNR floors, the emulated CPU engine
end to end, the native (sm_100) lowering as a graph, and portable plans: written for sm_100 here, verified,
finished for the CPU and equal to a direct CPU build."""

import json
import os
import shutil

import pytest
import torch

from fluxc import ir
from fluxc.build import BuildOptions, build
from fluxc.weights import engine_weights
from fluxc.numerics import NVFP4_LINEAR_SQNR_DB, NVFP4_SEGMENT_SQNR_DB, sqnr_db
from fluxc.passes import lower_nvfp4, quantize_nvfp4
from fluxc.passes.base import PassContext
from fluxc.passes.pipeline import LOWER, resolve, run_pipeline
from fluxc.plan import read_plan, verify_plan
from fluxc.recipes import RECIPES, bf16
from fluxc.runtime.ops import nvfp4
from fluxc.runtime.core.bundle import MANIFEST
from fluxc.runtime.core.errors import FluxcError

from conftest import TINY_TEXT, denoised_sqnr, random_embeddings
from test_fp8 import _segments, block_linears, tiny_bf16  # noqa: F401  (fixture)
from test_passes import _tensors
from fluxc.weights import call_graph as _run, one_linear_graph as _one_linear

# Per segment on `tiny`: every block linear becomes one fluxc.nvfp4_linear (a double block's fused img/txt QKV,
# both output projections, both MLPs; a single block's QKV, MLP and both halves of its split output
# projection); the modulation GEMM (one fused weight per block) is weight-only; head and tail stay bf16.
GOLDEN = {"head": {"quantized": 0, "weight_only": 0, "excluded": 8},
          "double": {"quantized": 8, "weight_only": 1, "excluded": 0},
          "single": {"quantized": 4, "weight_only": 1, "excluded": 0},
          "tail": {"quantized": 0, "weight_only": 0, "excluded": 2}}


def test_quantize_nvfp4_counts_and_segment_sqnr(tiny_bf16):  # noqa: F811
    recipe = RECIPES["sm100_nvfp4"]()
    for seg, plain in zip(_segments(tiny_bf16), _segments(tiny_bf16)):
        tensors = _tensors(seg.graph)
        want = _run(run_pipeline(plain.graph, PassContext(bf16(), "cpu", seg.kind)).graph, tensors)
        result = run_pipeline(seg.graph, PassContext(recipe, "cpu", seg.kind))
        assert result.counts["quantize_nvfp4"] == GOLDEN[seg.kind], seg.name
        assert result.counts["lower_nvfp4"] == {"emulated": GOLDEN[seg.kind]["quantized"]}, seg.name
        sqnrs = [sqnr_db(got, expected) for got, expected in zip(_run(result.graph, tensors), want)]
        assert min(sqnrs) >= NVFP4_SEGMENT_SQNR_DB, (seg.name, sqnrs)


def test_every_block_linear_meets_the_nvfp4_floor(tiny_bf16):  # noqa: F811
    """Each linear of a double and a single block, quantized and lowered alone, against float64 math on its
    real weight (modulation GEMMs weight-only, as the recipe says)."""
    recipe = RECIPES["sm100_nvfp4"]()
    floors = []
    for kind, name, w, b, x in block_linears(tiny_bf16):
        ctx = PassContext(recipe, "cpu", kind)
        result = quantize_nvfp4.run(_one_linear(w, b, 37, name), ctx)
        full = "norm" not in name
        assert result.counts == {"quantized": int(full), "weight_only": int(not full), "excluded": 0}, name
        gm = lower_nvfp4.run(result.graph, ctx).graph
        (got,) = _run(gm, {f"{name}.weight": w, f"{name}.bias": b, "x_1": x})
        want = x.double() @ w.double().t() + b.double()
        floors.append(sqnr_db(got, want))
        assert floors[-1] >= NVFP4_LINEAR_SQNR_DB, (kind, name, floors[-1])
    print(f"tiny nvfp4 linears against float64: {min(floors):.1f} to {max(floors):.1f} dB")
    assert len(floors) == 14 + 6


@pytest.fixture(scope="module")
def nvfp4_builds(tmp_path_factory):
    """Tiny CPU transformer-only builds at one profile: bf16, nvfp4 directly, and nvfp4 through a plan
    written for sm_100 and finished for the CPU."""
    root = tmp_path_factory.mktemp("nvfp4")
    common = dict(model="tiny", resolutions=((144, 112),), text_tokens=TINY_TEXT, transformer_only=True)
    paths = {name: str(root / name) for name in ("bf16.fluxe", "nvfp4.fluxe", "sm100.fluxp", "from-plan.fluxe")}
    build(BuildOptions(output=paths["bf16.fluxe"], target="cpu", precision="bf16", **common))
    build(BuildOptions(output=paths["nvfp4.fluxe"], target="cpu", precision="nvfp4", **common))
    build(BuildOptions(output=paths["sm100.fluxp"], target="sm_100", precision="nvfp4", stage="plan", **common))
    build(BuildOptions(model=None, output=paths["from-plan.fluxe"], target="cpu", from_plan=paths["sm100.fluxp"]))
    return paths


def _manifest(path):
    with open(os.path.join(path, MANIFEST)) as f:
        return json.load(f)


def test_nvfp4_engine_is_emulated_small_and_denoises_close_to_bf16(nvfp4_builds):
    m = _manifest(nvfp4_builds["nvfp4.fluxe"])
    assert (m["precision"], m["precision_mode"], m["recipe"]["name"]) == ("nvfp4", "emulated", "sm100_nvfp4")
    assert m["pass_counts"]["double-144x112"]["lower_nvfp4"] == {"emulated": 8}
    assert "attn.to_out.0.weight" in m["pass_reports"]["double-144x112"]["quantize_nvfp4"]["quantized"]
    assert all(c["max_relative_error"] <= 10 ** (-NVFP4_SEGMENT_SQNR_DB / 20) for c in m["numerics"].values())
    sizes = {p: os.path.getsize(os.path.join(nvfp4_builds[p], "weights.safetensors")) for p in ("bf16.fluxe", "nvfp4.fluxe")}
    assert sizes["nvfp4.fluxe"] < 0.5 * sizes["bf16.fluxe"], sizes  # tiny: the bf16 head and tail weigh relatively more
    sqnr = denoised_sqnr(nvfp4_builds["nvfp4.fluxe"], nvfp4_builds["bf16.fluxe"])
    print(f"tiny nvfp4 (emulated) engine, 8-step latents against the bf16 engine: {sqnr:.1f} dB")
    assert sqnr >= NVFP4_SEGMENT_SQNR_DB


def test_plan_round_trip_equals_direct_build(nvfp4_builds):
    """A plan written here for sm_100 (whose quantized linears are still fluxc.nvfp4_linear), verified, then
    finished for the CPU: the same engine output as building for the CPU directly."""
    from fluxc.runtime import Engine

    header = verify_plan(nvfp4_builds["sm100.fluxp"])
    assert header["target"] == "sm_100" and header["precision"] == "nvfp4"
    double = next(s for s in header["segments"] if s["kind"] == "double")
    targets = [n.get("target") for n in double["graph"]["nodes"]]
    assert targets.count("fluxc.nvfp4_linear.default") == 8 and "fluxc.nvfp4_quantize.default" not in targets
    finished = _manifest(nvfp4_builds["from-plan.fluxe"])
    assert finished["from_plan"]["plan"] == "sm100.fluxp" and finished["precision_mode"] == "emulated"
    pe, pooled = random_embeddings(dtype=torch.bfloat16)
    got, want = (Engine.load(nvfp4_builds[p]).denoise(pe, pooled, height=144, width=112, steps=4, seed=3)
                 for p in ("from-plan.fluxe", "nvfp4.fluxe"))
    assert torch.equal(got, want)


def test_native_lowering_of_a_plan_is_a_valid_sm100_graph(nvfp4_builds):
    """Compile check of the sm_100 path without a Blackwell GPU: the plan's graphs lowered for sm_100 verify
    (fake tensors propagate through _scaled_mm on float4_e2m1fn_x2 operands), every quantized linear becomes
    one block-scaled GEMM, and the swizzled weight scales the lowering asks for are made from the plan."""
    path = nvfp4_builds["sm100.fluxp"]
    p = read_plan(path, verify_plan(path), torch.device("cpu"))
    lower = [ps for ps in resolve(p.recipe, "sm_100") if ps.phase == LOWER]
    for seg in p.segments:
        result = run_pipeline(seg.graph, PassContext(p.recipe, "sm_100", seg.kind), passes=lower)
        seg.graph = result.graph
        if seg.kind in GOLDEN:
            assert result.counts["lower_nvfp4"] == {"native": GOLDEN[seg.kind]["quantized"]}, seg.name
            gemms = [n for n in seg.graph.graph.nodes if n.target == torch.ops.aten._scaled_mm.default]
            assert len(gemms) == GOLDEN[seg.kind]["quantized"]
            assert all(n.args[0].meta["val"].dtype == torch.float4_e2m1fn_x2 for n in gemms)
    weights = engine_weights(p.segments, p.weights)
    name = "transformer_blocks.0.nvfp4_swizzled(nvfp4_scale(attn.to_out.0.weight))"
    scales = p.weights["transformer_blocks.0.nvfp4_scale(attn.to_out.0.weight)"]
    assert torch.equal(weights[name].view(torch.uint8), nvfp4.swizzle_scales(scales).view(torch.uint8))


def test_damaged_or_foreign_plans_are_refused(nvfp4_builds, tmp_path):
    plan = str(tmp_path / "copy.fluxp")
    shutil.copytree(nvfp4_builds["sm100.fluxp"], plan)
    with open(os.path.join(plan, "weights.safetensors"), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    out = str(tmp_path / "e.fluxe")
    with pytest.raises(FluxcError, match="changed since the plan was written"):
        build(BuildOptions(model=None, output=out, target="cpu", from_plan=plan))
    with pytest.raises(FluxcError, match="is not a fluxc plan"):
        build(BuildOptions(model=None, output=out, target="cpu", from_plan=nvfp4_builds["nvfp4.fluxe"]))
    with pytest.raises(FluxcError, match="needs calibrated activation scales"):  # uncalibrated plan, checked first
        build(BuildOptions(model=None, output=out, target="cpu", from_plan=nvfp4_builds["sm100.fluxp"], backend="onnx"))
    assert not os.path.exists(out)


def test_plan_graphs_round_trip_through_json(tiny_bf16):  # noqa: F811
    for seg in _segments(tiny_bf16):
        gm = run_pipeline(seg.graph, PassContext(RECIPES["sm100_nvfp4"](), "cpu", seg.kind)).graph
        again = ir.from_json(json.loads(json.dumps(ir.to_json(gm))), torch.device("cpu"))
        assert ir.dump(again) == ir.dump(gm), seg.name
        assert [n.meta.get("weight") for n in again.graph.nodes] == [n.meta.get("weight") for n in gm.graph.nodes]
