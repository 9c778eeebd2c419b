"""fluxc's ops (`torch.ops.fluxc.*`) and the numerics they stand on. Importing this package registers every op,
which compiled segments call and the passes rewrite graphs to.

    kernels          the fused kernels (Triton / cuBLASLt / cuDNN on CUDA, a torch reference elsewhere)
    fp8_gemm         FP8 GEMMs with their epilogues (GELU + block quantization, gated residual) in one Triton kernel
    nvfp4            NVFP4 packing, scales, swizzle, quantize-dequantize and the nvfp4 ops
    ulysses          context parallelism's all-to-all attention ops
    onnx_reference   onnx.reference kernels for the custom ONNX ops fluxc exports (NVFP4's TensorRT pattern)
"""

from fluxc.runtime.ops import fp8_gemm, kernels, nvfp4, ulysses  # noqa: F401  (registers the ops)
