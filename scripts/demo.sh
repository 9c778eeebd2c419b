#!/usr/bin/env bash
# The main job: build a whole-pipeline engine and generate an image with it.
# On a CUDA GPU: FLUX.1-dev (seeded random weights) in bf16 at 1024x1024. On CPU: the tiny pipeline in fp32.
set -euo pipefail
mkdir -p out
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  fluxc build --model flux1-dev --precision bf16 --resolution 1024x1024 -o out/flux1-dev-bf16.fluxe
  fluxc run out/flux1-dev-bf16.fluxe --prompt "a photo of a cat sitting on a red chair" --steps 28 -o out/cat.png
else
  fluxc build --model tiny --target cpu --precision fp32 --resolution 144x112 -o out/tiny-fp32.fluxe
  fluxc inspect out/tiny-fp32.fluxe
  fluxc run out/tiny-fp32.fluxe --prompt "a photo of a cat sitting on a red chair" --steps 8 -o out/cat.png
fi
