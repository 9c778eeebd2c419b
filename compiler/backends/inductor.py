"""Inductor `standalone_compile`: one saved binary artifact per segment, static shapes."""

import contextlib
import functools
import hashlib
import os
from pathlib import Path

import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

import fluxc.runtime.ops
from fluxc.runtime.loaders import INDUCTOR_ARTIFACT, backend_versions, cache_folder, caches_at


class InductorBackend:
    name = "inductor"
    translates = frozenset()  # runs every lowering pass

    def compile(self, gm, example_inputs, out_dir, options):
        with build_caches():
            artifact = torch._inductor.standalone_compile(
                gm, example_inputs, dynamic_shapes="from_example_inputs", options={"config_patches": dict(options)})
        os.makedirs(out_dir, exist_ok=True)
        artifact.save(path=os.path.join(out_dir, INDUCTOR_ARTIFACT), format="binary")
        return artifact

    def versions(self):
        return backend_versions()


def build_caches():
    """The Inductor and Triton cache folders a build compiles in: $FLUXC_CACHE_DIR/build/<ops digest>, unless
    TORCHINDUCTOR_CACHE_DIR names another folder than Inductor's default (Inductor writes its default into the
    variable on first use, so that one is not the user's choice). AOTAutograd's cache keys a triton_op on its
    kernels' source, not on the launch options the op's Python body reads (fp8_gemm's CONFIGS and CUBLAS_BELOW, the
    kernels' warps), so in one shared cache a build after a fluxc upgrade that changed only those could reuse the
    older launches. Keyed on the ops' sources, each fluxc builds in its own folder; its rebuilds stay warm."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return contextlib.nullcontext()
    return caches_at(cache_folder("build", ops_digest()))


@functools.cache
def ops_digest() -> str:
    """sha256 (16 hex digits) over fluxc.runtime.ops' Python sources, names and bytes."""
    digest = hashlib.sha256()
    root = Path(fluxc.runtime.ops.__file__).parent
    for path in sorted(root.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
