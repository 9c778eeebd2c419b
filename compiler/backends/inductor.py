"""Inductor `standalone_compile`: one saved binary artifact per segment, static shapes."""

import os

import torch

from fluxc.runtime.loaders import INDUCTOR_ARTIFACT, backend_versions


class InductorBackend:
    name = "inductor"
    translates = frozenset()  # runs every lowering pass

    def compile(self, gm, example_inputs, out_dir, options):
        artifact = torch._inductor.standalone_compile(
            gm, example_inputs, dynamic_shapes="from_example_inputs", options={"config_patches": dict(options)})
        os.makedirs(out_dir, exist_ok=True)
        artifact.save(path=os.path.join(out_dir, INDUCTOR_ARTIFACT), format="binary")
        return artifact

    def versions(self):
        return backend_versions()
