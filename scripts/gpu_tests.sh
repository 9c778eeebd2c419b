#!/usr/bin/env bash
# Run on the lab GPU through the device tool (carry .whl; see README "GPU work"). Jobs, in the order given:
#   tests        the GPU-marked tests (default)
#   smoke        bench_pipeline.py on the tiny pipeline (a minute; checks the script before a long run)
#   pipeline     text-to-image benchmark, FLUX.1-dev 1024x1024, 28 steps      -> $OUT/bench_pipeline.json
#   transformer  per-step transformer benchmark, FLUX.1-dev 1024x1024          -> $OUT/bench_transformer.json
#                ($TRANSFORMER_VARIANTS: the fluxc engines, default "fluxc bf16,fluxc bf16 no hoist,fluxc bf16 unfused")
#   nvfp4        NVFP4 emulated engine, per-layer SQNR, sm_100 plan (FLUX.1-dev)  -> $OUT/bench_nvfp4.json
#   cache        cache points: skipped-step cost, forced 12/28 schedule ($CACHE_RECIPES, default bf16,sm90_fp8)
#                                                                               -> $OUT/bench_cache.json
#   parallel-build  engines for 1, 2, 4 ranks (bf16, fp8; fp8 pipeline for 4), side by side (multi-GPU kinds)
#   parallel        context parallelism on 1, 2, 4 GPUs after parallel-build    -> $OUT/bench_parallel.json
#                   ($PARALLEL_WORLDS, default 1,2,4, picks the world sizes for both: 1,2 on nvidia-h200-x2;
#                   other overlap-part counts: FLUXC_ULYSSES_CHUNKS=N)
#   flux2           FLUX.2-dev bf16/fp8/nvfp4 engines vs eager and torch.compile  -> $OUT/bench_flux2.json
#                   (phases fp8-epilogues, fp8-attn-epilogues: recipes sm90_fp8_epilogues, sm90_fp8_attn_epilogues,
#                   issue 31)
#                   ($FLUX2_PHASES splits it over calls: eager,bf16 writes $OUT/flux2_reference.safetensors, which
#                   later calls carry and name in $FLUX2_REFERENCE; a bf16 engine is 64 GB on disk)
#   load            cold start: verification and Engine.load of the FLUX.1-dev bf16 whole-pipeline engine
#                   (signed), against one-thread sha256                        -> $OUT/bench_load.json
#   serve           fluxc serve on a signed FLUX.1-dev whole-pipeline engine ($SERVE_PRECISION, default fp8;
#                   $SERVE_BATCH, default 1): $SERVE_STAGES start (cold start, process start to ready) and/or
#                   load (1, 4, 16 clients, Engine.generate direct), default start  -> $OUT/bench_serve.json
#   edit            FLUX.1 Kontext edit and img2img at strength 0.6, bf16 and fp8 engines vs FluxKontextPipeline /
#                   FluxImg2ImgPipeline eager and torch.compile ($EDIT_TASKS, default kontext,img2img)
#                                                                               -> $OUT/bench_edit.json
#   fp8gemm         FP8 GEMMs with their epilogues vs cuBLAS _scaled_mm + today's kernels, every FLUX.1-dev shape
#                   ($FP8GEMM_ARGS: more arguments, e.g. "--shapes 0,8 --ways tma,tma+flatten")
#                                                                               -> $OUT/bench_fp8_gemm.json
#   attention       fluxc.attention_fp8 on cuDNN and FlashAttention-3 (where flash_attn_3 is carried), bf16
#                   attention, cuDNN's FP8 SDPA plans, at FLUX.1-dev's shape   -> $OUT/bench_attention_fp8.json
#   activations     the FP8 step's memory-bound kernels per launch variant      -> $OUT/bench_activations.json
#   eval            whole-pipeline FLUX.1-dev engines ($EVAL_RECIPES, default sm90_fp8_attn,sm90_fp8_attn_epilogues):
#                   fluxc bench and fluxc eval records against diffusers' FluxPipeline eager (latent SQNR after
#                   the 28-step loop, image PSNR/SSIM; each engine deleted after its records)  -> $OUT/records/
# e.g. bash scripts/gpu_tests.sh tests smoke
# Benchmarks record $FLUXC_COMMIT (pass FLUXC_COMMIT=$(git rev-parse --short HEAD)): the GPU copy has no git history.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import transformers, tokenizers; print('transformers', transformers.__version__, 'tokenizers', tokenizers.__version__)"
rc=0
for job in "${@:-tests}"; do
  case $job in
    tests) python3 -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" || rc=1 ;;
    smoke) python3 scripts/bench_pipeline.py --model tiny --resolution 144x112 --steps 2 --repeats 1 \
             --out "$OUT/smoke.json" 2>&1 | tee "$OUT/smoke.log" || rc=1 ;;
    pipeline) python3 scripts/bench_pipeline.py --out "$OUT/bench_pipeline.json" 2>&1 | tee "$OUT/bench_pipeline.log" || rc=1 ;;
    transformer) python3 scripts/bench_transformer.py --out "$OUT/bench_transformer.json" \
             ${TRANSFORMER_VARIANTS:+--variants "$TRANSFORMER_VARIANTS"} 2>&1 | tee "$OUT/bench.log" || rc=1 ;;
    nvfp4) python3 scripts/bench_nvfp4.py --out "$OUT/bench_nvfp4.json" 2>&1 | tee "$OUT/bench_nvfp4.log" || rc=1 ;;
    cache) python3 scripts/bench_cache.py --recipes "${CACHE_RECIPES:-bf16,sm90_fp8}" --out "$OUT/bench_cache.json" \
             2>&1 | tee "$OUT/bench_cache.log" || rc=1 ;;
    parallel-build) python3 scripts/bench_parallel.py --stage build --workdir .engines/parallel \
             --worlds "${PARALLEL_WORLDS:-1,2,4}" --out "$OUT/parallel_build.json" 2>&1 | tee "$OUT/parallel_build.log" || rc=1 ;;
    parallel) python3 scripts/bench_parallel.py --stage time --workdir .engines/parallel --out "$OUT/bench_parallel.json" \
             --worlds "${PARALLEL_WORLDS:-1,2,4}" 2>&1 | tee "$OUT/bench_parallel.log" || rc=1 ;;
    flux2) python3 scripts/bench_flux2.py --phases "${FLUX2_PHASES:-eager,compile,bf16,fp8,nvfp4}" \
             --reference "${FLUX2_REFERENCE:-$OUT/flux2_reference.safetensors}" --out "$OUT/bench_flux2.json" \
             2>&1 | tee "$OUT/bench_flux2.log" || rc=1 ;;
    load) python3 scripts/bench_load.py --out "$OUT/bench_load.json" 2>&1 | tee "$OUT/bench_load.log" || rc=1 ;;
    serve) python3 scripts/bench_serve.py --stage "${SERVE_STAGES:-start}" --precision "${SERVE_PRECISION:-fp8}" \
             --batch "${SERVE_BATCH:-1}" --out "$OUT/bench_serve.json" 2>&1 | tee "$OUT/bench_serve.log" || rc=1 ;;
    edit) python3 scripts/bench_edit.py --tasks "${EDIT_TASKS:-kontext,img2img}" --repeats "${EDIT_REPEATS:-3}" --out "$OUT/bench_edit.json" \
             2>&1 | tee "$OUT/bench_edit.log" || rc=1 ;;
    fp8gemm) python3 scripts/bench_fp8_gemm.py --out "$OUT/bench_fp8_gemm.json" $FP8GEMM_ARGS 2>&1 | tee "$OUT/bench_fp8_gemm.log" || rc=1 ;;
    attention) python3 scripts/bench_attention_fp8.py --out "$OUT/bench_attention_fp8.json" 2>&1 \
             | tee "$OUT/bench_attention_fp8.log" || rc=1 ;;
    activations) python3 scripts/bench_activations.py --out "$OUT/bench_activations.json" 2>&1 \
             | tee "$OUT/bench_activations.log" || rc=1 ;;
    eval) recipes=${EVAL_RECIPES:-sm90_fp8_attn,sm90_fp8_attn_epilogues}
          python3 scripts/bench_engines.py --recipes "$recipes" --reference eager --drop "$recipes" \
             --workdir .engines --out "$OUT/records" 2>&1 | tee "$OUT/bench_eval.log" || rc=1 ;;
    *) echo "unknown job $job"; rc=1 ;;
  esac
done
# the logs are committed: paths in them relative to the checkout, not this machine's
sed -i "s#$PWD/##g" "$OUT"/*.log 2>/dev/null
exit $rc
