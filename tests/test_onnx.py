"""The ONNX backend (first part of issue 9): every segment of the tiny pipeline as an opset-23 model with the
graph's fusions as standard ops, checked by onnx.checker, run by ONNX Runtime on the CPU and compared with
diffusers' FluxPipeline."""

import importlib.util
import os

import numpy as np
import pytest
import torch

from conftest import TINY_TEXT

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def onnx_engine_path(tmp_path_factory, tiny_pipeline_dir):
    from fluxc.build import BuildOptions, build

    path = str(tmp_path_factory.mktemp("engines") / "tiny-onnx.fluxe")
    build(BuildOptions(model=tiny_pipeline_dir, output=path, target="cpu", precision="fp32", resolutions=((144, 112),),
                       text_tokens=TINY_TEXT, backend="onnx"))
    return path


def test_every_segment_is_a_checked_opset_23_model(onnx_engine_path):
    from fluxc.runtime.core.bundle import read_manifest

    manifest = read_manifest(onnx_engine_path)
    assert manifest["backend"]["name"] == "onnx" and manifest["backend"]["opset"] == "23"
    ops = {}
    for seg in manifest["segments"]:
        path = os.path.join(onnx_engine_path, seg["dir"], "segment.onnx")
        onnx.checker.check_model(path, full_check=True)
        model = onnx.load(path)
        assert {o.domain: o.version for o in model.opset_import}.get("", 0) == 23
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), seg["name"]  # standard ops only
        ops[seg["kind"]] = {n.op_type for n in model.graph.node}
    # the fusions the passes made survive as the standard ops ONNX has for them
    assert {"Attention", "RMSNormalization", "LayerNormalization", "Gelu"} <= ops["double"]
    assert {"Attention", "RMSNormalization", "LayerNormalization", "Gelu"} <= ops["single"]
    assert "Attention" in ops["clip"] and "Attention" in ops["t5"]
    assert all(v["max_relative_error"] <= 1e-4 for v in manifest["numerics"].values())


def test_onnx_engine_image_matches_flux_pipeline(onnx_engine_path, tiny_pipeline_dir):
    from diffusers import FluxPipeline

    from fluxc.runtime import Engine

    prompt = "a photo of a cat sitting on a red chair"
    got = Engine.load(onnx_engine_path).generate(prompt, height=144, width=112, steps=4, seed=3, output_type="np")
    ref = FluxPipeline.from_pretrained(tiny_pipeline_dir, torch_dtype=torch.float32)(
        prompt, height=144, width=112, num_inference_steps=4, guidance_scale=3.5, max_sequence_length=TINY_TEXT,
        generator=torch.Generator("cpu").manual_seed(3), output_type="np").images
    assert np.abs(got - ref).max() <= 1e-3 and ref.std() > 0.05


def _one_op_model(path, op_type: str, elem_type: int) -> None:
    from onnx import helper

    x, y = (helper.make_tensor_value_info(n, elem_type, [64]) for n in ("x", "y"))
    graph = helper.make_graph([helper.make_node(op_type, ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10), str(path / "segment.onnx"))


def test_bf16_models_run_widened_and_rounded_like_bf16(tmp_path):
    """ONNX Runtime's CPU provider has no bf16 Sigmoid: the loader runs it in float32 and rounds to bf16."""
    from fluxc.runtime.loaders import load_onnx

    _one_op_model(tmp_path, "Sigmoid", onnx.TensorProto.BFLOAT16)
    x = torch.randn(64).to(torch.bfloat16)
    got, = load_onnx(str(tmp_path))(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, torch.sigmoid(x.float()).to(torch.bfloat16))


def test_a_model_onnx_runtime_cannot_run_is_a_clear_error(tmp_path):
    from fluxc.runtime.loaders import load_onnx
    from fluxc.runtime.core.errors import FluxcError

    _one_op_model(tmp_path, "Gelu", onnx.TensorProto.DOUBLE)  # no float64 Gelu kernel in ONNX Runtime's CPU provider
    with pytest.raises(FluxcError, match="cannot run segment"):
        load_onnx(str(tmp_path))


@pytest.fixture(scope="module")
def transformer_engines(tmp_path_factory):
    """Tiny transformer-only CPU engines in bf16, fp8 and nvfp4 (calibrated on 2 samples, as the ONNX export
    needs), each from both backends (same weights, one profile)."""
    from fluxc.build import BuildOptions, build

    paths = {}
    for precision in ("bf16", "fp8", "nvfp4"):
        for backend in ("inductor", "onnx"):
            paths[precision, backend] = str(tmp_path_factory.mktemp("engines") / f"tiny-{precision}-{backend}.fluxe")
            build(BuildOptions(model="tiny", output=paths[precision, backend], target="cpu", precision=precision,
                               resolutions=((144, 112),), text_tokens=TINY_TEXT, transformer_only=True, backend=backend,
                               calibrate=2 if precision == "nvfp4" else 0))
    return paths


def _segment_models(path):
    from fluxc.runtime.core.bundle import read_manifest

    return {seg["kind"]: onnx.load(os.path.join(path, seg["dir"], "segment.onnx")) for seg in read_manifest(path)["segments"]}


@pytest.mark.parametrize("precision", ["bf16", "fp8", "nvfp4"])
def test_every_transformer_segment_passes_the_full_onnx_check(transformer_engines, precision):
    from fluxc.runtime.core.bundle import read_manifest

    path = transformer_engines[precision, "onnx"]
    for seg in read_manifest(path)["segments"]:
        onnx.checker.check_model(os.path.join(path, seg["dir"], "segment.onnx"), full_check=True)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_onnx_runtime_reproduces_the_torch_engine(transformer_engines, precision):
    """ONNX Runtime on the CPU (bf16 values widened to float32 but rounded to bf16 after every op; float8
    GEMMs as DequantizeLinear + MatMul) against the Inductor engine of the same precision: 8 denoising steps."""
    from conftest import denoised_sqnr

    onnx_path = transformer_engines[precision, "onnx"]
    assert denoised_sqnr(onnx_path, transformer_engines[precision, "inductor"]) >= 35.0  # ~40-45 dB measured
    if precision == "fp8":
        for kind in ("double", "single"):
            _assert_float8_qdq(onnx.load(os.path.join(onnx_path, "segments", f"{kind}-144x112", "segment.onnx")))


def _assert_float8_qdq(model):
    """Every GEMM is MatMul(DequantizeLinear(a), DequantizeLinear(w)): w an e4m3 weight input, a made by a
    QuantizeLinear to float8 (through views); no float8 Cast is left."""
    f8 = onnx.TensorProto.FLOAT8E4M3FN
    weights = {i.name for i in model.graph.input if i.type.tensor_type.elem_type == f8}
    producer = {o: n for n in model.graph.node for o in n.output}

    def source(value):
        """The value behind views: (its producer node or None, its name)."""
        while value in producer and producer[value].op_type in ("Reshape", "Transpose"):
            value = producer[value].input[0]
        return producer.get(value), value

    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    dqs = [source(i)[0] for n in matmuls for i in n.input]
    assert matmuls and all(dq is not None and dq.op_type == "DequantizeLinear" for dq in dqs)
    quantized = [source(dq.input[0]) for dq in dqs]
    assert sum(name in weights for _, name in quantized) == len(matmuls)
    assert all(name in weights or node.op_type == "QuantizeLinear" for node, name in quantized)
    assert not [n for n in model.graph.node if n.op_type == "Cast" and any(a.name == "to" and a.i == f8 for a in n.attribute)]


def test_nvfp4_segments_are_tensorrt_s_fp4_pattern(transformer_engines):
    """Each NVFP4 linear as ModelOpt exports it: TRT_FP4DynamicQuantize of the activation on a constant-per-layer
    global scale, two-level DequantizeLinear (block 16) of it and of a packed FLOAT4E2M1 weight input, MatMul."""
    from fluxc.runtime.core.bundle import read_manifest

    path = transformer_engines["nvfp4", "onnx"]
    counts = {seg["kind"]: seg["op_counts"]["fluxc.nvfp4_linear.default"] for seg in read_manifest(path)["segments"]
              if "fluxc.nvfp4_linear.default" in seg["op_counts"]}
    models = _segment_models(path)
    assert set(counts) == {"double", "single"}
    for kind, n_linears in counts.items():
        graph = models[kind].graph
        fp4_inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT4E2M1}
        producer = {o: n for n in graph.node for o in n.output}
        quantizers = [n for n in graph.node if n.op_type == "TRT_FP4DynamicQuantize"]
        assert len(quantizers) == n_linears == len(fp4_inputs)
        assert all(n.domain == "trt" and {a.name: a.i for a in n.attribute} == {"axis": -1, "block_size": 16, "scale_type": 17}
                   for n in quantizers)
        for matmul in (n for n in graph.node if n.op_type == "MatMul"):
            x, w = (producer[v] for v in matmul.input)
            w = producer[w.input[0]] if w.op_type == "Transpose" else w
            for dq, source in ((x, "TRT_FP4DynamicQuantize"), (w, None)):
                assert dq.op_type == "DequantizeLinear" and producer[dq.input[1]].op_type == "DequantizeLinear"
                assert (dq.input[0] in fp4_inputs) if source is None else producer[dq.input[0]].op_type == source


def test_one_nvfp4_linear_in_onnx_reference_matches_the_torch_op(tmp_path):
    """ONNX's two-level DequantizeLinear of float4 and the transcribed TensorRT quantizer, in onnx.reference, against
    fluxc's torch op on the same operands (they round alike but for e4m3 ties in the block scales, and add the
    global scales in another order), and both against float64 math."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fluxc.backends.onnx import OnnxBackend
    from fluxc.numerics import NVFP4_LINEAR_SQNR_DB, sqnr_db
    from fluxc.runtime.ops import nvfp4

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 256, generator=g), torch.randn(96, generator=g).to(torch.bfloat16)
    x = (torch.randn(40, 256, generator=g) * torch.rand(40, 1, generator=g) * 4).to(torch.bfloat16)
    codes, scales, w_global = nvfp4.quantize_weight(w)
    x_global = (x.float().abs().amax() / nvfp4.GLOBAL_DIVISOR * 1.25).reshape(1)  # a calibrated amax, a bit above
    operands = [codes, scales, w_global, b, x_global, x]
    gm = make_fx(lambda c, s, wg, b, xg, x: [torch.ops.fluxc.nvfp4_linear.default(x, c, s, wg, b, xg)])(*operands)
    got, = OnnxBackend().compile(gm, operands, str(tmp_path), {})(*operands)
    want = torch.ops.fluxc.nvfp4_linear(x, codes, scales, w_global, b, x_global)
    exact = x.double() @ w.double().t() + b.double()
    assert sqnr_db(got, want) >= 40.0  # ~50 dB measured: bf16 rounding of the GEMM and a few tied block scales
    assert sqnr_db(got, exact) >= NVFP4_LINEAR_SQNR_DB and sqnr_db(want, exact) >= NVFP4_LINEAR_SQNR_DB


def test_nvfp4_onnx_engine_denoises_like_the_torch_engine(transformer_engines):
    """8 denoising steps of the whole ONNX NVFP4 engine in onnx.reference against the bf16 engine, as good as the
    Inductor NVFP4 engine's (two correct NVFP4 engines differ by about their quantization noise: an upstream
    difference of one bf16 ulp moves values across e2m1 rounding boundaries), and close to it."""
    from conftest import denoised_sqnr

    from fluxc.numerics import NVFP4_SEGMENT_SQNR_DB

    onnx_vs_bf16 = denoised_sqnr(transformer_engines["nvfp4", "onnx"], transformer_engines["bf16", "inductor"])
    torch_vs_bf16 = denoised_sqnr(transformer_engines["nvfp4", "inductor"], transformer_engines["bf16", "inductor"])
    between = denoised_sqnr(transformer_engines["nvfp4", "onnx"], transformer_engines["nvfp4", "inductor"])
    print(f"8-step latents: onnx nvfp4 vs bf16 {onnx_vs_bf16:.1f} dB, torch nvfp4 vs bf16 {torch_vs_bf16:.1f} dB, "
          f"onnx vs torch nvfp4 {between:.1f} dB")
    assert onnx_vs_bf16 >= max(NVFP4_SEGMENT_SQNR_DB, torch_vs_bf16 - 1.0)  # measured 22.6 vs 22.8 dB
    assert between >= 25.0  # measured 30 dB


HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.parametrize("args, message", [
    pytest.param(["--backend", "tensorrt"], "Build the stage TensorRT takes with --backend onnx",
                 marks=pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")),
    (["--backend", "onnx", "--precision", "nvfp4"], "needs calibrated activation scales"),
    (["--backend", "onnx", "--precision", "fp8", "--recipe", "sm90_fp8_attn"], "FP8 attention"),
])
def test_backends_that_cannot_build_this_say_so_first(tmp_path, args, message):
    """Refused before any work: nothing is written."""
    from click.testing import CliRunner

    from fluxc.cli import main

    out = tmp_path / "x.fluxe"
    result = CliRunner().invoke(main, ["build", "--model", "tiny", "--target", "cpu", *args, "-o", str(out)])
    assert result.exit_code == 1 and message in result.output and not out.exists()


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp8", "nvfp4"])
def test_tensorrt_engine_denoises_like_the_inductor_engine(tmp_path, precision):
    """Where TensorRT is installed (not in fluxc's lab): a tiny transformer-only engine built with --backend
    tensorrt on the GPU, 8 steps against the Inductor engine of the same precision (NVFP4: sm_100+ only)."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed: the TensorRT path stops at the ONNX models")
    from conftest import denoised_sqnr

    from fluxc.build import BuildOptions, build
    from fluxc.runtime.core.targets import local_target

    if precision == "nvfp4" and int(local_target().removeprefix("sm_").rstrip("a")) < 100:
        pytest.skip("TensorRT's NVFP4 kernels need sm_100 or newer")
    paths = {}
    for backend in ("inductor", "tensorrt"):
        paths[backend] = str(tmp_path / f"{backend}.fluxe")
        build(BuildOptions(model="tiny", output=paths[backend], target="auto", precision=precision, backend=backend,
                           resolutions=((144, 112),), text_tokens=TINY_TEXT, transformer_only=True,
                           calibrate=2 if precision == "nvfp4" else 0))
    assert os.path.exists(os.path.join(paths["tensorrt"], "segments", "double-144x112", "segment.plan"))
    assert denoised_sqnr(paths["tensorrt"], paths["inductor"]) >= {"bf16": 35.0, "fp8": 30.0, "nvfp4": 25.0}[precision]
