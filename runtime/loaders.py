"""Loading saved segment artifacts, one loader per backend name (the compile side is in fluxc.backends)."""

import atexit
import os
import shutil
import tempfile
from contextlib import contextmanager

import torch

from fluxc.runtime.core.schema import SEGMENT_FILES
from fluxc.runtime.core.errors import FluxcError
from fluxc.runtime.ops import onnx_reference  # the package import registers torch.ops.fluxc.*, which segments call
from fluxc.runtime.ops.onnx_reference import from_numpy, to_numpy, widen_bf16

INDUCTOR_ARTIFACT, ONNX_MODEL, TENSORRT_PLAN = (SEGMENT_FILES[b] for b in ("inductor", "onnx", "tensorrt"))
TENSORRT_IO = "io.json"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def backend_versions() -> dict[str, str]:
    """Versions an Inductor artifact is tied to; the runtime refuses an engine built with another torch."""
    return {
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
    }


def segment_cache(digest: str | None) -> str:
    """The folder Inductor's and Triton's on-disk caches use while one artifact loads. An Inductor artifact is a set
    of cache entries (pickles, generated modules) that loading copies into the cache and runs from there, so with
    the shared cache (/tmp/torchinductor_<user>) an entry one engine brings could run when another engine loads.
    Each verified artifact gets its own folder, named by its digest, under $FLUXC_CACHE_DIR (default
    ~/.cache/fluxc): only byte-identical artifacts share one, and what loading compiles (the CPU's C++ kernels)
    is compiled once, not at every start. Artifacts loaded unverified (digest None) share a temporary folder private
    to this process."""
    global _unverified
    if digest is None:
        if _unverified is None:
            _unverified = tempfile.mkdtemp(prefix="fluxc-unverified-")
            atexit.register(shutil.rmtree, _unverified, True)
        return _unverified
    return cache_folder("segments", digest)


def cache_folder(*parts: str) -> str:
    """A private folder under $FLUXC_CACHE_DIR (default ~/.cache/fluxc), created if missing."""
    root = os.environ.get("FLUXC_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                             os.path.expanduser("~/.cache"), "fluxc")
    folder = os.path.join(root, *parts)
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError as e:
        raise FluxcError(f"Cannot create the cache folder {folder}: {e.strerror}.",
                         "Set FLUXC_CACHE_DIR to a folder you can write.") from None
    return folder


_unverified: str | None = None


@contextmanager
def caches_at(folder: str):
    """Inductor's and Triton's cache folders set to `folder` for the block."""
    saved = {name: os.environ.get(name) for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"] = folder, os.path.join(folder, "triton")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load_inductor(segment_dir: str, digest: str | None):
    """The compiled segment; digest: the artifact's, as verified (None: not verified)."""
    path = os.path.join(segment_dir, INDUCTOR_ARTIFACT)
    try:
        # compile_threads=1: a fresh process would otherwise start Inductor's pool of compile workers (one Python
        # with torch per core) on the first Triton kernel it loads, though the kernels come from the cache
        with caches_at(segment_cache(digest)), torch._inductor.config.patch(compile_threads=1):
            return torch._inductor.CompiledArtifact.load(path=path, format="binary")
    except Exception as e:  # a damaged artifact passes the digest check only when the digests were rewritten
        raise FluxcError(f"Cannot load compiled segment {path}: {type(e).__name__}: {e}",
                         "Rebuild the engine with this torch version.") from None


def load_onnx(segment_dir: str, digest: str | None = None):
    """An ONNX Runtime session over the segment's model, called like a compiled segment: tensors in, tensors out.
    Where the provider has no kernels for the model's bfloat16 ops (ONNX Runtime's CPU provider has almost none),
    the model runs widened to float32 (widen_bf16) and its bfloat16 outputs are rounded back. Models ONNX
    Runtime cannot run at all (NVFP4: TensorRT's TRT_FP4DynamicQuantize, float4 weights) run in onnx.reference
    (fluxc.runtime.ops.onnx_reference): slow, for checks and tiny engines."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise FluxcError("This engine's segments are ONNX models; running them needs onnx and onnxruntime.",
                         "pip install onnx onnxruntime (or onnxruntime-gpu), or rebuild with --backend inductor.") from None
    path = os.path.join(segment_dir, ONNX_MODEL)
    model = onnx.load(path, load_external_data=False)
    if onnx_reference.needs_reference(model):
        return onnx_reference.runner(path, model)
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in onnxruntime.get_available_providers()]
    rounded: set[str] = set()  # outputs that were bfloat16 before widening
    # basic graph optimizations only: the extended level's Q/DQ fusions also match float8 DequantizeLinear +
    # MatMul and turn them into an integer GEMM that rejects float8 (ONNX Runtime 1.31)
    settings = onnxruntime.SessionOptions()
    settings.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options = dict(sess_options=settings, providers=providers)
    try:
        session = onnxruntime.InferenceSession(path, **options)
    except onnxruntime.capi.onnxruntime_pybind11_state.NotImplemented as e:
        widened, rounded = widen_bf16(path)
        if not rounded:
            raise FluxcError(f"ONNX Runtime ({', '.join(providers)}) cannot run segment {path}: {e}",
                             "Rebuild with --backend inductor, or run the ONNX models with TensorRT.") from None
        session = onnxruntime.InferenceSession(widened, **options)
    inputs, outputs = session.get_inputs(), [o.name for o in session.get_outputs()]

    def run(*tensors: torch.Tensor) -> list[torch.Tensor]:
        feeds = {i.name: to_numpy(t, i.type) for i, t in zip(inputs, tensors)}
        return [from_numpy(a, tensors[0].device, name in rounded) for a, name in zip(session.run(None, feeds), outputs)]

    return run


def load_tensorrt(segment_dir: str, digest: str | None = None):
    """A TensorRT execution context over the segment's plan, called like a compiled segment: CUDA tensors in (the
    layer's weights first, bound by address, no copies), new CUDA tensors out, on torch's current stream (so a
    CUDA graph captures it like any kernel)."""
    import json

    try:
        import tensorrt as trt
    except ImportError:
        raise FluxcError("This engine's segments are TensorRT plans; running them needs TensorRT (import tensorrt).",
                         "Install TensorRT matching the one that built the engine, or rebuild with --backend inductor.") from None
    with open(os.path.join(segment_dir, TENSORRT_PLAN), "rb") as f:
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(f.read())
    if engine is None:  # another TensorRT version or GPU
        raise FluxcError(f"TensorRT cannot load {segment_dir}/{TENSORRT_PLAN} on this machine (another TensorRT "
                         "version or GPU built it).", "Rebuild the engine here with --backend tensorrt.")
    with open(os.path.join(segment_dir, TENSORRT_IO)) as f:
        io = json.load(f)
    context = engine.create_execution_context()
    outputs = [(name, tuple(engine.get_tensor_shape(name)), _TRT_DTYPES[engine.get_tensor_dtype(name).name])
               for name in io["outputs"]]

    def run(*tensors: torch.Tensor) -> list[torch.Tensor]:
        tensors = [t.contiguous() for t in tensors]  # alive until the call returns; the stream orders their reuse
        for name, t in zip(io["inputs"], tensors):
            context.set_tensor_address(name, t.data_ptr())
        outs = [torch.empty(shape, dtype=dtype, device=tensors[0].device) for _, shape, dtype in outputs]
        for (name, _, _), t in zip(outputs, outs):
            context.set_tensor_address(name, t.data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise FluxcError(f"TensorRT failed to run segment {segment_dir}.", "See TensorRT's log above.")
        return outs

    return run


_TRT_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "FP8": torch.float8_e4m3fn,
               "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}

LOADERS = {"inductor": load_inductor, "onnx": load_onnx, "tensorrt": load_tensorrt}
