"""ONNX: one opset-23 model per segment, run by ONNX Runtime; the input TensorRT's parser takes.

torch.onnx's exporter (dynamo) translates the rewritten segment graph, with fluxc's fused ops as standard
ONNX ops (fluxc.backends.onnx_ops). Weights stay graph inputs, as in every fluxc segment: one model per
segment kind serves all its layers, fed from the engine's one weight file. After export, quantize_linear
turns the FP8 activation quantization Inductor would have fused into QuantizeLinear. NVFP4 segments are
exported before lower_nvfp4 (which picks kernels for Inductor): fluxc.nvfp4_linear becomes the TensorRT
pattern in onnx_ops, its packed codes FLOAT4E2M1 inputs. Each model is checked
with onnx.checker (full check, with shape inference) before the build goes on. Shapes are static: one
model per resolution profile, as the engine's profiles are.
"""

import collections
import os

import torch

from fluxc.backends import onnx_ops
from fluxc.runtime.loaders import ONNX_MODEL, backend_versions, load_onnx
from fluxc.runtime.core.errors import FluxcError

OPSET = 23


def quantize_linear(model) -> int:
    """Rewrite Cast(x / scale, to=float8e4m3fn) into QuantizeLinear(x, scale, output_dtype=float8e4m3fn): the
    activation quantization Inductor would fuse (quantize_fp8's aten ops) in the form TensorRT's parser fuses.
    The same math: divide, round to nearest even, saturate (a runtime may compute the quotient differently
    in its last bit). The scale is per tensor or one per row (blocked along the last axis, block = the row).
    Returns how many it rewrote."""
    import onnx
    from onnx import TensorProto, helper

    inferred = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.input, *inferred.value_info, *inferred.output]}
    graph = model.graph
    nodes = list(graph.node)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}  # value -> index of the node making it
    uses = collections.Counter(i for n in nodes for i in n.input)
    replaced = {}  # index of a Cast -> the nodes that replace it; index of its Div -> [] (it goes)
    for k, node in enumerate(nodes):
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type != "Cast" or to != TensorProto.FLOAT8E4M3FN or node.input[0] not in producer:
            continue
        at_div = producer[node.input[0]]
        div = nodes[at_div]
        if div.op_type != "Div" or uses[div.output[0]] != 1:
            continue
        x, scale = div.input
        x_shape, s_shape = shapes.get(x), shapes.get(scale)
        if not x_shape or s_shape is None:
            continue
        f8 = dict(name=node.name, output_dtype=TensorProto.FLOAT8E4M3FN)
        if all(size == 1 for size in s_shape):  # per tensor: the scale as a scalar
            no_dims, scalar = f"{node.name}__no_dims", f"{node.name}__scale"
            graph.initializer.append(helper.make_tensor(no_dims, TensorProto.INT64, [0], []))
            replaced[k] = [helper.make_node("Reshape", [scale, no_dims], [scalar]),
                           helper.make_node("QuantizeLinear", [x, scalar], list(node.output), **f8)]
        elif s_shape[:-1] == x_shape[:-1] and s_shape[-1] == 1:  # one per row
            replaced[k] = [helper.make_node("QuantizeLinear", [x, scale], list(node.output), axis=-1,
                                            block_size=x_shape[-1], **f8)]
        else:
            continue
        replaced[at_div] = []
    del graph.node[:]
    graph.node.extend(new for k, n in enumerate(nodes) for new in replaced.get(k, [n]))  # in place: order stays valid
    return sum(1 for v in replaced.values() if v)


def as_float4(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The example inputs with NVFP4 weight codes (u8 [N, K/2] into fluxc.nvfp4_linear or nvfp4_dequantize) viewed
    as float4_e2m1fn_x2, which the exporter types as ONNX's packed FLOAT4E2M1 [N, K]: the same bytes."""
    readers = {torch.ops.fluxc.nvfp4_linear.default: 1, torch.ops.fluxc.nvfp4_dequantize.default: 0}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    codes = {n for n in placeholders
             if any(u.target in readers and u.args[readers[u.target]] is n for u in n.users)}
    return [t.view(torch.float4_e2m1fn_x2) if n in codes else t for n, t in zip(placeholders, example_inputs)]


class OnnxBackend:
    name = "onnx"
    translates = frozenset({"lower_nvfp4"})  # lowering passes it skips: it translates fluxc.nvfp4_linear itself

    def compile(self, gm, example_inputs, out_dir, options):
        del options  # Inductor config; nothing to patch here
        self.export(gm, example_inputs, out_dir)
        return load_onnx(out_dir)

    def export(self, gm, example_inputs, out_dir) -> None:
        """Write out_dir/segment.onnx and check it."""
        import onnx

        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, ONNX_MODEL)
        gm.eval()  # a traced graph has no train-mode behaviour; this silences the exporter's warning
        try:
            program = torch.onnx.export(gm, tuple(as_float4(gm, example_inputs)), dynamo=True, opset_version=OPSET,
                                        verbose=False, custom_translation_table=onnx_ops.table())
        except Exception as e:  # the exporter's summary names the op it has no translation for
            lines = str(e).splitlines()
            why = next((line for line in lines if "No ONNX function found" in line or "Error" in line[:40]), lines[0])
            raise FluxcError(f"ONNX export of segment {os.path.basename(out_dir)} failed: {why.strip()}",
                             "Build this precision with --backend inductor.") from None
        model = program.model_proto
        quantize_linear(model)
        onnx.save_model(model, path, save_as_external_data=model.ByteSize() > 1 << 30)
        onnx.checker.check_model(path, full_check=True)

    def versions(self):
        import onnx
        import onnxruntime

        return backend_versions() | {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                                     "opset": str(OPSET)}
