"""Pass pipeline on the tiny model: golden rewrite counts, exactness, and the individual rules."""

import pytest
import torch

from fluxc import ir
from fluxc.passes import remove_noop_ops
from fluxc.passes.base import PassContext
from fluxc.passes.pipeline import resolve, run_pipeline
from fluxc.recipes import bf16, reference
from fluxc.runtime.flux_math import Profile
from fluxc.trace import trace_model
from torch.fx.experimental.proxy_tensor import make_fx

# Pinned on `tiny`. Per double block: 4 RMSNorms (q, k, added q, added k) each add eps in place;
# the shared norm output feeds q/k/v as 3 equal views (+2 merged per stream) ... A change here means a
# pass started or stopped firing: look at `fluxc build --dump-ir` before re-pinning.
GOLDEN = {
    "head": {"functionalize_inplace": {"inplace_to_outofplace": 0}, "dedupe_nodes": {"merged": 5}},
    "double": {"functionalize_inplace": {"inplace_to_outofplace": 4}, "dedupe_nodes": {"merged": 9}},
    "single": {"functionalize_inplace": {"inplace_to_outofplace": 2}, "dedupe_nodes": {"merged": 7}},
    "tail": {"functionalize_inplace": {"inplace_to_outofplace": 0}, "dedupe_nodes": {"merged": 0}},
}


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def traced(request, tiny_fp32):
    dtype = torch.float32 if request.param == "fp32" else torch.bfloat16
    model = tiny_fp32 if dtype == torch.float32 else _tiny_bf16()
    recipe = reference() if dtype == torch.float32 else bf16()
    return recipe, trace_model(model, [Profile(144, 112, 13)], torch.device("cpu"), dtype)


def _tiny_bf16():
    from fluxc.models import load_model

    return load_model("tiny", dtype=torch.bfloat16, device=torch.device("cpu"), seed=0)


def _random_inputs(gm):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n.meta["val"].shape, generator=g).to(n.meta["val"].dtype)
            for n in gm.graph.nodes if n.op == "placeholder"]


def test_pipeline_counts_are_pinned_and_exact(traced):
    recipe, segments = traced
    for seg in segments:
        inputs = _random_inputs(seg.graph)
        before = seg.graph(*inputs)
        n_before = len(seg.graph.graph.nodes)
        gm, counts = run_pipeline(seg.graph, PassContext(recipe, "cpu", seg.kind), segment_name=seg.name)
        for name, expected in GOLDEN[seg.kind].items():
            assert counts[name] == expected, (seg.name, name, counts[name])
        after = gm(*inputs)
        for a, b in zip(after, before):  # canonicalization is exact
            assert torch.equal(a, b), seg.name
        assert len(gm.graph.nodes) < n_before or seg.kind == "tail"
        assert not any(n.op == "call_function" and n.target._schema.is_mutable
                       for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload))


def test_dump_ir_writes_one_file_per_pass(tiny_fp32, tmp_path):
    seg = trace_model(tiny_fp32, [Profile(144, 112, 13)], torch.device("cpu"), torch.float32)[1]
    run_pipeline(seg.graph, PassContext(reference(), "cpu", seg.kind), str(tmp_path), seg.name)
    names = sorted(p.name for p in tmp_path.iterdir())
    expected = [f"{i:02d}-{p}-{seg.name}.txt" for i, p in
                enumerate(["trace"] + [p.name for p in resolve(reference(), "cpu")])]
    assert names == expected
    text = (tmp_path / names[-1]).read_text()
    assert "%attn_to_q_weight: f32[256, 256] = input" in text and "add_." not in text


def test_remove_noop_ops_rules():
    aten = torch.ops.aten

    def f(x):  # x: bf16[4, 8]
        a = aten.view(aten.clone(x), [4, 8])  # identity_view + identity_cast
        b = aten._to_copy(aten._to_copy(a, dtype=torch.float32), dtype=torch.bfloat16)  # cast_roundtrip
        d = aten._to_copy(aten._to_copy(b, dtype=torch.float16), dtype=torch.bfloat16)  # lossy: kept
        return [d]

    x = torch.randn(4, 8, dtype=torch.bfloat16)
    gm = make_fx(f, tracing_mode="fake")(x)
    result = remove_noop_ops.run(gm, PassContext(reference(), "cpu", "double"))
    assert result.counts == {"identity_view": 1, "identity_cast": 1, "cast_roundtrip": 1}
    assert torch.equal(result.graph(x)[0], f(x)[0])
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
