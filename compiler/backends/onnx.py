"""ONNX: one opset-23 model per segment, run by ONNX Runtime; the input TensorRT's parser takes.

torch.onnx's exporter (dynamo) translates the rewritten segment graph, with fluxc's fused ops as standard
ONNX ops (fluxc.backends.onnx_ops). Weights stay graph inputs, as in every fluxc segment: one model per
segment kind serves all its layers, fed from the engine's one weight file. Each model is checked with
onnx.checker (full check, with shape inference) before the build goes on. Shapes are static: one model
per resolution profile, as the engine's profiles are.
"""

import os

import torch

from fluxc.backends import onnx_ops
from fluxc.runtime.backends import ONNX_MODEL, backend_versions, load_onnx
from fluxc.runtime.errors import FluxcError

OPSET = 23


class OnnxBackend:
    name = "onnx"

    def compile(self, gm, example_inputs, out_dir, options):
        import onnx

        del options  # Inductor config; nothing to patch here
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, ONNX_MODEL)
        gm.eval()  # a traced graph has no train-mode behaviour; this silences the exporter's warning
        try:
            program = torch.onnx.export(gm, tuple(example_inputs), dynamo=True, opset_version=OPSET, verbose=False,
                                        custom_translation_table=onnx_ops.table())
        except Exception as e:  # the exporter's summary names the op it has no translation for
            lines = str(e).splitlines()
            why = next((line for line in lines if "No ONNX function found" in line or "Error" in line[:40]), lines[0])
            raise FluxcError(f"ONNX export of segment {os.path.basename(out_dir)} failed: {why.strip()}",
                             "Build this precision with --backend inductor.") from None
        program.save(path, external_data=sum(t.numel() * t.element_size() for t in example_inputs) > 1 << 30)
        onnx.checker.check_model(path, full_check=True)
        return load_onnx(out_dir)

    def versions(self):
        import onnx
        import onnxruntime

        return backend_versions() | {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                                     "opset": str(OPSET)}
