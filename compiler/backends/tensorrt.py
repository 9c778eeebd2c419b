"""TensorRT: the ONNX backend's model, then a TensorRT plan built from it. Runs only where `import tensorrt` works.

Each segment directory holds segment.onnx (as --backend onnx writes it), segment.plan and io.json (the plan's
input and output names in the segment's calling order). The network is strongly typed: every tensor's type
comes from the ONNX model (bf16 compute, float8 and float4 Q/DQ), as TensorRT requires for FP8 and NVFP4, so
no precision flags are set. Shapes are static (one model per resolution profile), so each plan has the one
implicit optimization profile. Timings are shared through one timing cache per machine (TIMING_CACHE).
Weights stay network inputs, as in every fluxc segment: a plan holds no weights (what TensorRT's
strip-weights option gives) and one plan per segment kind serves all its layers from the engine's one
weight file, bound per call; no refit step is needed.
"""

import json
import os

from fluxc.backends.onnx import OnnxBackend
from fluxc.runtime.core.bundle import save_atomically
from fluxc.runtime.loaders import ONNX_MODEL, TENSORRT_IO, TENSORRT_PLAN, load_tensorrt
from fluxc.runtime.core.errors import FluxcError

TIMING_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fluxc", "tensorrt-timing.cache")


class TensorRTBackend(OnnxBackend):
    name = "tensorrt"

    def compile(self, gm, example_inputs, out_dir, options):
        del options  # Inductor config
        self.export(gm, example_inputs, out_dir)
        import onnx
        import tensorrt as trt

        path = os.path.join(out_dir, ONNX_MODEL)
        model = onnx.load(path, load_external_data=False)
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(path):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise FluxcError(f"TensorRT's ONNX parser rejected segment {os.path.basename(out_dir)}: {errors}",
                             "Build with --backend onnx and report the parser error with the model.")
        config = builder.create_builder_config()
        cache = config.create_timing_cache(_read(TIMING_CACHE))
        config.set_timing_cache(cache, ignore_mismatch=True)  # a cache from another GPU or version is not used
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise FluxcError(f"TensorRT could not build segment {os.path.basename(out_dir)} (its log says why).",
                             "Build with --backend onnx, or --backend inductor.")
        with open(os.path.join(out_dir, TENSORRT_PLAN), "wb") as f:
            f.write(plan)
        with open(os.path.join(out_dir, TENSORRT_IO), "w") as f:
            json.dump({"inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output]}, f)
        os.makedirs(os.path.dirname(TIMING_CACHE), exist_ok=True)
        save_atomically(TIMING_CACHE, lambda tmp: _write(tmp, memoryview(config.get_timing_cache().serialize())))
        return load_tensorrt(out_dir)

    def versions(self):
        import tensorrt

        return super().versions() | {"tensorrt": tensorrt.__version__}


def _write(path: str, data) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""
