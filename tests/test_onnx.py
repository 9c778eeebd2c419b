"""The ONNX backend (first part of issue 9): every segment of the tiny pipeline as an opset-23 model with the
graph's fusions as standard ops, checked by onnx.checker, run by ONNX Runtime on the CPU and compared with
diffusers' FluxPipeline."""

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
    from fluxc.runtime.bundle import read_manifest

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


def test_a_model_onnx_runtime_cannot_run_is_a_clear_error(tmp_path):
    from onnx import TensorProto, helper

    from fluxc.runtime.backends import load_onnx
    from fluxc.runtime.errors import FluxcError

    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [4])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [4])
    graph = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    onnx.save(model, str(tmp_path / "segment.onnx"))
    with pytest.raises(FluxcError, match="cannot run segment"):
        load_onnx(str(tmp_path))
