"""Running ONNX models that use TensorRT's own ops (domain "trt") without TensorRT: onnx.reference.

fluxc's NVFP4 ONNX models quantize activations with TRT_FP4DynamicQuantize, which TensorRT's ONNX parser
implements and ONNX Runtime does not. Here the model runs in onnx.reference (numpy, float32, slow: for
checking an export and running tiny engines, not for serving), with the op transcribed from TensorRT's
operator documentation (DynamicQuantize) and NVIDIA ModelOpt's reference for it:
    inputs   x [..., K] float, double_quant_scale (a scalar, the per-tensor global scale)
    attrs    axis = -1, block_size = 16, scale_type = float8e4m3fn
    per block of 16 along the last axis:
             block_scale = e4m3(min(amax|block| / 6 / double_quant_scale, 448))    (round to nearest even)
             y           = e2m1(clip(block / (f32(block_scale) * double_quant_scale), -6, 6)),  0 where that is 0
    outputs  y float4e2m1 [..., K], block_scale float8e4m3fn [..., K/16]
It is independent of fluxc.runtime.ops.nvfp4 (numpy and ml_dtypes' roundings, not fluxc's torch quantizer).
"""

import numpy as np
import torch

TRT_DOMAIN = "trt"
FLOAT4E2M1 = 23  # onnx.TensorProto


def register_trt_schemas() -> None:
    """Declare TRT_FP4DynamicQuantize's signature to onnx (once per process), so exporters and onnx.checker can
    type its outputs."""
    from onnx import defs

    if defs.has("TRT_FP4DynamicQuantize", TRT_DOMAIN):
        return
    param, attr, int_ = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute, defs.OpSchema.AttrType.INT
    defs.register_schema(defs.OpSchema(
        "TRT_FP4DynamicQuantize", TRT_DOMAIN, 1,
        doc="TensorRT's dynamic NVFP4 block quantization (IDynamicQuantizeLayer).",
        inputs=[param("x", "T1"), param("double_quant_scale", "tensor(float)")],
        outputs=[param("y", "T2"), param("y_scale", "T3")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "the input's type"),
                          ("T2", ["tensor(float4e2m1)"], "NVFP4 values"), ("T3", ["tensor(float8e4m3fn)"], "block scales")],
        attributes=[attr("axis", int_, "the blocked axis"), attr("block_size", int_, "elements per scale"),
                    attr("scale_type", int_, "the block scales' type (float8e4m3fn)")]))


def _fp4_dynamic_quantize(x, double_quant_scale, axis=-1, block_size=16, scale_type=17):
    import ml_dtypes

    if (axis not in (-1, x.ndim - 1)) or block_size != 16 or scale_type != 17:
        raise NotImplementedError(f"TRT_FP4DynamicQuantize(axis={axis}, block_size={block_size}, scale_type={scale_type})")
    s = np.float32(double_quant_scale)
    blocks = x.astype(np.float32).reshape(*x.shape[:-1], -1, block_size)
    amax = np.abs(blocks).max(-1, keepdims=True)
    scale = np.minimum(amax / np.float32(6.0) / s, np.float32(448.0)).astype(ml_dtypes.float8_e4m3fn)
    step = scale.astype(np.float32) * s
    q = np.clip(np.divide(blocks, step, out=np.zeros_like(blocks), where=step > 0), -6.0, 6.0)
    return q.astype(ml_dtypes.float4_e2m1fn).reshape(x.shape), scale[..., 0]


def reference_session(path: str):
    """(an onnx.reference evaluator over the model at `path`, with TensorRT's ops fluxc exports; the names of its
    outputs that were bfloat16). bfloat16 values are
    computed in float32 and rounded to bfloat16 after each op (widen_bf16): onnx.reference
    computes in its inputs' type, and layer norms or softmaxes accumulated in bfloat16 are no reference."""
    import onnx
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class TRT_FP4DynamicQuantize(OpRun):
        op_domain = TRT_DOMAIN

        def _run(self, x, double_quant_scale, axis=None, block_size=None, scale_type=None):
            return _fp4_dynamic_quantize(x, double_quant_scale, -1 if axis is None else axis, block_size or 16,
                                         scale_type or 17)

    widened, rounded = widen_bf16(path)
    return ReferenceEvaluator(onnx.load_from_string(widened), new_ops=[TRT_FP4DynamicQuantize]), rounded


def needs_reference(model) -> bool:
    """Whether ONNX Runtime cannot run the model: it uses TensorRT's ops or takes float4 inputs."""
    return (any(n.domain == TRT_DOMAIN for n in model.graph.node)
            or any(i.type.tensor_type.elem_type == FLOAT4E2M1 for i in model.graph.input))


def runner(path: str, model):
    """The model as a segment callable (tensors in, tensors out) on onnx.reference."""
    import ml_dtypes

    session, rounded = reference_session(path)
    types = [i.type.tensor_type.elem_type for i in model.graph.input]
    names = [i.name for i in model.graph.input]
    to_bf16 = [o.name in rounded for o in model.graph.output]

    def feed(t: torch.Tensor, elem_type: int):
        t = t.detach().cpu()
        if elem_type == FLOAT4E2M1:  # fluxc's packed codes [..., K/2] u8 -> one e2m1 per element [..., K]
            codes = t.view(torch.uint8).numpy()
            return np.stack((codes & 15, codes >> 4), -1).reshape(*codes.shape[:-1], -1).view(ml_dtypes.float4_e2m1fn)
        if t.dtype == torch.float8_e4m3fn:
            return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # bfloat16 inputs were widened

    def run(*tensors: torch.Tensor) -> list[torch.Tensor]:
        outs = session.run(None, {n: feed(t, e) for n, t, e in zip(names, tensors, types)})
        return [from_numpy(np.ascontiguousarray(a), tensors[0].device, bf16) for a, bf16 in zip(outs, to_bf16)]

    return run


# ---- numpy and ONNX Runtime conversions, shared with the ONNX loader (runtime/loaders.py) ----
def widen_bf16(path: str) -> tuple[bytes, set[str]]:
    """The model computing in float32 where it computed in bfloat16, with every value that was bfloat16 still
    rounded to bfloat16 (Cast to bfloat16 and back after the op that makes it: ONNX Runtime's CPU provider
    casts bfloat16 but has few other bfloat16 kernels), serialized; and the names of the bfloat16 outputs.
    Rounding stays where the model rounds (FLUX's timestep * 1000 in bfloat16 moves the time embedding by
    ~50% if it does not); only accumulation inside ops gets wider."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    bf16, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT
    graph = model.graph
    was_bf16 = {v.name for v in [*graph.input, *graph.output, *graph.value_info] if v.type.tensor_type.elem_type == bf16}
    was_bf16 |= {i.name for i in graph.initializer if i.data_type == bf16}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == bf16:
            value.type.tensor_type.elem_type = f32

    def widened(tensor):
        return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)

    for init in graph.initializer:
        if init.data_type == bf16:
            init.CopyFrom(widened(init))
    nodes = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == bf16:
                attr.i = f32
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == bf16:
                attr.t.CopyFrom(widened(attr.t))
        nodes.append(node)
        for k, out in enumerate(node.output):
            if out in was_bf16:  # round it as the bfloat16 model stores it
                node.output[k] = f"{out}__wide"
                nodes += [helper.make_node("Cast", [f"{out}__wide"], [f"{out}__bf16"], to=bf16),
                          helper.make_node("Cast", [f"{out}__bf16"], [out], to=f32)]
    del graph.node[:]
    graph.node.extend(nodes)
    return model.SerializeToString(), {o.name for o in graph.output if o.name in was_bf16}


def to_numpy(t: torch.Tensor, ort_type: str):
    """A tensor as the session's input type wants it ('tensor(float)', 'tensor(bfloat16)', ...); float8 goes in
    as its bytes with the ONNX type named (numpy has no float8)."""
    t = t.detach().cpu()
    if t.dtype == torch.float8_e4m3fn:
        from onnxruntime import OrtValue

        return OrtValue.ortvalue_from_numpy_with_onnx_type(t.view(torch.uint8).numpy(), 17)  # FLOAT8E4M3FN
    if t.dtype != torch.bfloat16:
        return t.numpy()
    if ort_type == "tensor(float)":
        return t.float().numpy()
    import ml_dtypes

    return t.float().numpy().astype(ml_dtypes.bfloat16)


def from_numpy(a, device: torch.device, to_bf16: bool) -> torch.Tensor:
    """A runtime's output array as a tensor on `device`: bfloat16 where it is (or was, before widen_bf16)."""
    if a.dtype.name == "bfloat16":
        a, to_bf16 = a.astype("float32"), True
    t = torch.from_numpy(a)
    return (t.to(torch.bfloat16) if to_bf16 else t).to(device)
