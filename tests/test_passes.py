"""Pass pipeline on the tiny model: golden rewrite counts, each pass's numerics contract, the rules."""

import dataclasses

import pytest
import torch

from fluxc import ir
from fluxc.numerics import RELATIVE_ERROR_FLOORS, REWRITE_TOLERANCE, relative_error
from fluxc.passes import fuse_qk_norm_rope, remove_noop_ops
from fluxc.passes.base import PassContext
from fluxc.passes.pipeline import resolve, run_pipeline
from fluxc.recipes import bf16, reference
from fluxc.runtime.core.profile import Profile
from fluxc.runtime.core.families import FAMILIES
from fluxc.frontend.trace import schedule_segment, segment_modules, trace_model
from fluxc.weights import call_graph as _run

SCHEDULE_INPUTS = FAMILIES["flux1"].schedule_inputs
from torch.fx.experimental.proxy_tensor import make_fx

# Pinned on `tiny` (per segment; the engine runs each block segment for 2 layers). Per double block: 4
# RMSNorms each add eps in place; the shared norm output feeds q/k/v as 3 equal views (+2 merged per
# stream) ... Fusion, per double block: img QKV, txt QKV and the two AdaLN modulation GEMVs fuse (3 groups
# of 8 linears), both MLPs get the GELU epilogue, one q/k norm+RoPE; per single block: QKV (the MLP keeps
# its GELU epilogue), the output projection split over [attention, MLP], one q/k norm+RoPE. AdaLN: norm1 of
# both streams per double block (norm2 follows a residual add: left to Inductor), the single block's
# norm, norm_out in the tail.
# A change here means a pass started or stopped firing: look at `fluxc build --dump-ir` before re-pinning.
NO_FUSION = {"fuse_qkv": {"groups": 0, "linears": 0}, "fuse_epilogues": {"bias_gelu": 0, "split_concat": 0},
             "fuse_qk_norm_rope": {"fused": 0}, "fuse_adaln": {"fused": 0}}
GOLDEN = {
    "head": {"functionalize_inplace": {"inplace_to_outofplace": 0}, "dedupe_nodes": {"merged": 5}, **NO_FUSION},
    "double": {"functionalize_inplace": {"inplace_to_outofplace": 4}, "dedupe_nodes": {"merged": 9},
               "fuse_qkv": {"groups": 3, "linears": 8}, "fuse_epilogues": {"bias_gelu": 2, "split_concat": 0},
               "fuse_qk_norm_rope": {"fused": 1}, "fuse_adaln": {"fused": 2}},
    "single": {"functionalize_inplace": {"inplace_to_outofplace": 2}, "dedupe_nodes": {"merged": 7},
               "fuse_qkv": {"groups": 1, "linears": 3}, "fuse_epilogues": {"bias_gelu": 1, "split_concat": 1},
               "fuse_qk_norm_rope": {"fused": 1}, "fuse_adaln": {"fused": 1}},
    "tail": {"functionalize_inplace": {"inplace_to_outofplace": 0}, "dedupe_nodes": {"merged": 0},
             **NO_FUSION, "fuse_adaln": {"fused": 1}},
}
FUSIONS = ["fuse_qkv", "fuse_epilogues", "fuse_qk_norm_rope", "fuse_adaln"]


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def tiny_model(request, tiny_fp32):
    if request.param == "fp32":
        return tiny_fp32, reference()
    from fluxc.frontend.models import load_model

    return load_model("tiny", dtype=torch.bfloat16, device=torch.device("cpu"), seed=0), bf16()


def _segments(model):
    dtype = next(model.module.parameters()).dtype
    return trace_model(model, [Profile(144, 112, 13)], torch.device("cpu"), dtype)


def _tensors(gm) -> dict[str, torch.Tensor]:
    """Random values for a traced graph's inputs, by weight name or activation name."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            key = n.meta["weight"].name if "weight" in n.meta else n.name
            out[key] = torch.randn(n.meta["val"].shape, generator=g).to(n.meta["val"].dtype) * 0.5
    return out


def _pipeline(seg, recipe, only=None):
    """Run the pipeline; `only`: keep the canonicalize phase and just that fusion pass."""
    passes = [p for p in resolve(recipe, "cpu") if only is None or p.phase != "fuse" or p.name == only]
    return run_pipeline(seg.graph, PassContext(recipe, "cpu", seg.kind), segment_name=seg.name, passes=passes)


def test_canonicalize_counts_are_pinned_and_exact(tiny_model):
    model, recipe = tiny_model
    for seg in _segments(model):
        tensors = _tensors(seg.graph)
        before = _run(seg.graph, tensors)
        n_before = len(seg.graph.graph.nodes)
        result = _pipeline(seg, dataclasses.replace(recipe, fusion=False))
        for name in ("functionalize_inplace", "dedupe_nodes"):
            assert result.counts[name] == GOLDEN[seg.kind][name], (seg.name, name, result.counts[name])
        # the single block's join of the joint sequence, and its split at the end, fold away
        assert result.counts["remove_noop_ops"]["cat_of_slices"] == (2 if seg.kind == "single" else 0)
        for a, b in zip(_run(result.graph, tensors), before):  # canonicalization is exact
            assert torch.equal(a, b), seg.name
        assert len(result.graph.graph.nodes) < n_before or seg.kind == "tail"
        assert not any(n.op == "call_function" and n.target._schema.is_mutable
                       for n in result.graph.graph.nodes if isinstance(n.target, torch._ops.OpOverload))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_each_fusion_is_pinned_and_within_its_tolerance(tiny_model, fusion):
    """Each fusion alone against the canonicalized, unfused segment."""
    model, recipe = tiny_model
    dtype = next(model.module.parameters()).dtype
    for seg, unfused in zip(_segments(model), _segments(model)):
        tensors = _tensors(seg.graph)
        expected = _run(_pipeline(unfused, dataclasses.replace(recipe, fusion=False)).graph, tensors)
        result = _pipeline(seg, recipe, only=fusion)
        assert result.counts[fusion] == GOLDEN[seg.kind][fusion], (seg.name, result.counts[fusion])
        for got, want, name in zip(_run(result.graph, tensors), expected, seg.outputs):
            assert relative_error(got, want) <= REWRITE_TOLERANCE[dtype], (fusion, seg.name, name)


def test_fused_segments_match_diffusers_eager(tiny_model):
    """The whole pipeline against the diffusers module each segment was traced from, on layer 0's weights."""
    model, recipe = tiny_model
    modules = segment_modules(model, 13)
    floor = RELATIVE_ERROR_FLOORS[recipe.precision.value]
    attention_fused = 0
    for seg in _segments(model):
        module, layers = modules[seg.kind]
        weights = {n.removeprefix("inner."): t for n, t in module.state_dict().items()}
        result = _pipeline(seg, recipe)
        attention_fused += result.counts["fuse_qk_norm_rope"]["fused"] * len(layers)
        g = torch.Generator().manual_seed(1)
        acts = {k: torch.randn(v.shape, generator=g).to(v.dtype) * (0.5 if v.is_floating_point() else 1)
                for k, v in seg.example.items()}
        if "timestep" in acts:
            acts["timestep"], acts["guidance"] = acts["timestep"].abs(), acts["guidance"].abs() * 4
        with torch.no_grad():
            want = module(*acts.values())
        got = _run(result.graph, weights | acts)
        for g_, w_, name in zip(got, want if isinstance(want, tuple) else (want,), seg.outputs):
            assert relative_error(g_, w_) <= floor, (seg.name, name, relative_error(g_, w_))
    cfg = model.config
    assert attention_fused == cfg["num_layers"] + cfg["num_single_layers"]  # every attention call fused


def test_shard_attention_puts_the_single_blocks_mlp_between_the_transfer_steps(tiny_model):
    """--world-size 2: every attention becomes the three Ulysses steps; in the single block, whose MLP does not
    depend on attention, with the MLP input GEMM between send and attend and the output projection's MLP half
    between attend and receive; with fusion on, the send takes qk_norm_rope's inputs (its kernel fills the
    buffer). In one process the ops are attention over what they hold, so the segment computes what the
    world-size-1 segment computes."""
    model, recipe = tiny_model
    dtype = next(model.module.parameters()).dtype
    ops = torch.ops.fluxc
    for seg, plain in zip(_segments(model), _segments(model)):
        tensors = _tensors(seg.graph)
        expected = _run(run_pipeline(plain.graph, PassContext(recipe, "cpu", plain.kind)).graph, tensors)
        result = run_pipeline(seg.graph, PassContext(recipe, "cpu", seg.kind, world_size=2))
        blocks = seg.kind in ("double", "single")
        folded = int(blocks and recipe.fusion)  # fuse_qk_norm_rope made the op the send then takes in
        assert result.counts["shard_attention"] == {"ulysses": int(blocks), "overlap": int(seg.kind == "single"),
                                                    "qk_norm_rope": folded, "e4m3": 0}
        nodes = list(result.graph.graph.nodes)
        steps = {op: [i for i, n in enumerate(nodes) if n.target is op.default]
                 for op in (ops.ulysses_send_qk if folded else ops.ulysses_send, ops.ulysses_attend,
                            ops.ulysses_receive)}
        if folded:
            assert not any(n.target is ops.qk_norm_rope.default for n in nodes)
        if blocks:
            (send,), (attend,), (receive,) = steps.values()
            assert send < attend < receive
        if seg.kind == "single":
            before, after = nodes[attend].args[1], nodes[receive].args[1]
            assert before and after  # the MLP input GEMM; the output projection's MLP half
            assert all(send < nodes.index(n) < attend for n in before)
            assert all(attend < nodes.index(n) < receive for n in after)
        for got, want, name in zip(_run(result.graph, tensors), expected, seg.outputs):
            assert relative_error(got, want) <= REWRITE_TOLERANCE[dtype], (seg.name, name)


@pytest.mark.parametrize("fusion", [True, False])
def test_hoist_schedule_splits_exactly_and_row_by_row(tiny_model, fusion):
    """The loop graph fed by the graph hoist_schedule split off equals the segment without hoisting, exactly;
    that graph, re-traced for 5 rows as the build does, computes each row as it computes the row alone."""
    model, recipe = tiny_model
    recipe = dataclasses.replace(recipe, fusion=fusion)
    dtype = next(model.module.parameters()).dtype
    # one value per segment: the head's temb, each block's modulation GEMM (a double block's two when
    # fuse_qkv is off), norm_out's in the tail
    want_values = {"head": 1, "double": 1 if fusion else 2, "single": 1, "tail": 1}
    for seg, plain in zip(_segments(model), _segments(model)):
        tensors = _tensors(seg.graph)
        expected = dict(zip(plain.outputs, _run(_pipeline(plain, recipe).graph, tensors)))
        result = run_pipeline(seg.graph, PassContext(recipe, "cpu", seg.kind, SCHEDULE_INPUTS[seg.kind]))
        assert result.counts["hoist_schedule"] == {"values": want_values[seg.kind]}, seg.name
        hoisted = result.side["schedule"]
        assert not set(SCHEDULE_INPUTS[seg.kind]) & set(seg.inputs)  # the loop no longer reads them
        values = dict(zip(hoisted.values, _run(hoisted.graph, tensors)))
        got = values | dict(zip(seg.outputs, _run(result.graph, tensors | values)))
        assert seg.outputs == [n for n in plain.outputs if n not in hoisted.values]
        for name, want in expected.items():
            assert torch.equal(got[name], want), (seg.name, name)

        rows = schedule_segment(seg, hoisted, rows=5)
        batched = _run(rows.graph, tensors | rows.example)
        for r in range(5):
            alone = _run(hoisted.graph, tensors | {k: v[r:r + 1] for k, v in rows.example.items()})
            for b, a in zip(batched, alone):
                assert relative_error(b[r:r + 1], a) <= REWRITE_TOLERANCE[dtype], (seg.name, r)


def test_qk_norm_rope_reference_equals_diffusers():
    """fluxc.qk_norm_rope's reference against diffusers' own RMSNorm and apply_rotary_emb, double-block style."""
    from diffusers.models.embeddings import apply_rotary_emb

    g = torch.Generator().manual_seed(0)
    b, t, s, h, d = 2, 5, 11, 3, 16
    parts = [torch.randn(b, n, h, d, generator=g) for n in (t, s)]
    weights = [torch.rand(d, generator=g) + 0.5 for _ in range(2)]
    angles = torch.randn(t + s, d // 2, generator=g).repeat_interleave(2, dim=1)
    cos, sin = angles.cos(), angles.sin()
    norms = []
    for w in weights:
        norm = torch.nn.RMSNorm(d, eps=1e-6)
        norm.weight.data.copy_(w)
        norms.append(norm)
    want = apply_rotary_emb(torch.cat([n(x) for n, x in zip(norms, parts)], 1), (cos, sin), sequence_dim=1)
    q, k = torch.ops.fluxc.qk_norm_rope(parts, parts, weights, weights, cos, sin, 1e-6)
    torch.testing.assert_close(q, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, want, rtol=1e-5, atol=1e-5)


def test_adaln_reference_equals_float64_math():
    """fluxc.adaln's reference against LayerNorm + modulation written out in float64."""
    g = torch.Generator().manual_seed(0)
    x, scale, shift = torch.randn(2, 9, 48, generator=g) * 3, torch.randn(2, 48, generator=g), torch.randn(2, 48, generator=g)
    xd = x.double()
    normed = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-6)
    want = normed * (1 + scale.double()[:, None]) + shift.double()[:, None]
    torch.testing.assert_close(torch.ops.fluxc.adaln(x, scale, shift, 1e-6).double(), want, rtol=1e-5, atol=1e-5)


def test_explain_names_the_rejecting_check(tiny_fp32):
    head = _segments(tiny_fp32)[0]
    assert run_pipeline(head.graph, PassContext(reference(), "cpu", "head")).explain["fuse_qkv"].endswith(
        "no other linear reads its input view")

    def attention_without_rope(q, k, v, w):  # [B, S, H, D]; q and k are normed, but nothing rotates them
        q, k = (torch.nn.functional.rms_norm(t, [t.shape[-1]], w) for t in (q, k))
        return [torch.nn.functional.scaled_dot_product_attention(*(t.permute(0, 2, 1, 3) for t in (q, k, v)))]

    x, w = torch.randn(1, 5, 2, 8), torch.ones(8)
    gm = make_fx(attention_without_rope, tracing_mode="fake")(x, x, x, w)
    result = fuse_qk_norm_rope.run(gm, PassContext(reference(), "cpu", "single"))
    assert result.counts == {"fused": 0}
    (rejection,) = result.rejected
    assert rejection.depth == 2 and rejection.reason.startswith("RoPE: expected add.Tensor, found aten.mul.Tensor")


def test_dump_ir_writes_one_file_per_pass(tiny_fp32, tmp_path):
    seg = trace_model(tiny_fp32, [Profile(144, 112, 13)], torch.device("cpu"), torch.float32)[1]
    run_pipeline(seg.graph, PassContext(reference(), "cpu", seg.kind), str(tmp_path), seg.name)
    names = sorted(p.name for p in tmp_path.iterdir())
    passes = ["trace"] + [p.name for p in resolve(reference(), "cpu")]
    expected = [f"{i:02d}-{p}-{seg.name}.txt" for i, p in enumerate(passes)]
    expected.append(f"{passes.index('insert_cache_points'):02d}-insert_cache_points-{seg.name}-probe.txt")  # its side graph
    assert names == sorted(expected)
    text = (tmp_path / names[-1]).read_text()
    assert "%cat0_attn_to_q_weight_attn_to_k_weight_attn_to_v_weight: f32[768, 256] = input" in text
    assert "fluxc.qk_norm_rope(" in text and "add_." not in text


def test_remove_noop_ops_rules():
    aten = torch.ops.aten

    def f(x):  # x: bf16[4, 8]
        a = aten.view(aten.clone(x), [4, 8])  # identity_view + identity_cast
        b = aten._to_copy(aten._to_copy(a, dtype=torch.float32), dtype=torch.bfloat16)  # cast_roundtrip
        d = aten._to_copy(aten._to_copy(b, dtype=torch.float16), dtype=torch.bfloat16)  # lossy: kept
        e = aten.cat([aten.slice(d, 1, 0, 3), aten.slice(d, 1, 3, 9223372036854775807)], 1)  # cat_of_slices
        f_ = aten.cat([aten.slice(e, 1, 0, 3), aten.slice(e, 1, 4, 8)], 1)  # leaves a column out: kept
        return [e, f_]

    x = torch.randn(4, 8, dtype=torch.bfloat16)
    gm = make_fx(f, tracing_mode="fake")(x)
    result = remove_noop_ops.run(gm, PassContext(reference(), "cpu", "double"))
    assert result.counts == {"identity_view": 1, "identity_cast": 1, "cast_roundtrip": 1, "cat_of_slices": 1}
    assert all(torch.equal(a, b) for a, b in zip(result.graph(x), f(x)))
    rule, reason = remove_noop_ops.match(next(n for n in result.graph.graph.nodes if n.op == "call_function"))
    assert rule is None and "changes values" in reason


def test_eval_dropout_never_reaches_the_ir():
    gm = make_fx(lambda x: torch.nn.functional.dropout(x * 2, 0.3, training=False), tracing_mode="fake")(
        torch.randn(2, 8))
    assert [str(n.target) for n in gm.graph.nodes if n.op == "call_function"] == ["aten.mul.Tensor"]


def test_verifier_rejects_broken_graphs(tiny_fp32):
    seg = trace_model(tiny_fp32, [Profile(144, 112, 13)], torch.device("cpu"), torch.float32)[3]
    ir.verify(seg.graph)
    node = next(n for n in seg.graph.graph.nodes if n.op == "call_function")
    del node.meta["val"]
    with pytest.raises(ir.IRError, match="no meta"):
        ir.verify(seg.graph, "tail")


def test_qkv_with_mlp_variant(tiny_fp32):
    """recipe.qkv_with_mlp: the single block's MLP projection joins its QKV GEMM; its GELU then cannot be an
    epilogue, and the output projection's concatenation stays (Inductor writes the GELU into it)."""
    recipe = dataclasses.replace(reference(), qkv_with_mlp=True)
    single = _segments(tiny_fp32)[2]
    tensors = _tensors(single.graph)
    expected = _run(_pipeline(_segments(tiny_fp32)[2], dataclasses.replace(recipe, fusion=False)).graph, tensors)
    result = _pipeline(single, recipe)
    assert result.counts["fuse_qkv"] == {"groups": 1, "linears": 4}
    assert result.counts["fuse_epilogues"] == {"bias_gelu": 0, "split_concat": 0}
    assert relative_error(_run(result.graph, tensors)[0], expected[0]) <= REWRITE_TOLERANCE[torch.float32]


def test_triton_ops_are_compiled_into_the_segments(hopper_driver):
    """adaln, adaln_fp8, gelu_fp8 and qk_norm_rope[_fp8] are triton_ops: AOTAutograd traces a CUDA call into their
    Triton kernels (one launch per part for qk_norm_rope), so Inductor compiles them into the segment and the engine
    carries them (the first generate compiles nothing), and each kernel writes only the op's new outputs."""
    from conftest import kernels_writing, segment_nodes

    bf16, f32 = torch.bfloat16, torch.float32
    x, mod = ((2, 64, 256), bf16), ((2, 256), bf16)
    assert kernels_writing(segment_nodes(torch.ops.fluxc.adaln, 0, x, mod, mod, 1e-6)) == [["out_ptr"]]
    assert kernels_writing(segment_nodes(torch.ops.fluxc.adaln_fp8, 2, x, mod, mod, 1e-6)) == \
        [["out_ptr", "row_scale_ptr"]]
    assert kernels_writing(segment_nodes(torch.ops.fluxc.gelu_fp8, 2, ((128, 512), bf16))) == \
        [["out_ptr", "row_scale_ptr"]]
    parts = [((1, 16, 4, 64), bf16), ((1, 48, 4, 64), bf16)]
    rope = ((64, 64), f32)
    qk = (parts, parts, [((64,), bf16)] * 2, [((64,), bf16)] * 2, rope, rope, 1e-6)
    assert kernels_writing(segment_nodes(torch.ops.fluxc.qk_norm_rope, 2, *qk)) == [["qo_ptr", "ko_ptr"]] * 2
    scale = ((1, 1, 1, 1), f32)
    assert kernels_writing(segment_nodes(torch.ops.fluxc.qk_norm_rope_fp8, 2, *qk, scale, scale)) == \
        [["qo_ptr", "ko_ptr"]] * 2


def test_every_recipe_survives_the_manifest():
    """A recipe written into a manifest (JSON) reads back equal, as fluxc refit requires of the engine's recipe, and
    an engine of the format before fp8_epilogues named its epilogues (a bool) reads as the epilogues it fused."""
    import json

    from fluxc.recipes import RECIPES
    from fluxc.recipes.base import recipe_from_dict

    for make in RECIPES.values():
        assert recipe_from_dict(json.loads(json.dumps(make().to_dict()))) == make()
    before = RECIPES["sm90_fp8_epilogues"]().to_dict() | {"fp8_epilogues": True}
    assert recipe_from_dict(before).fp8_epilogues == ("gate_residual", "gelu")
