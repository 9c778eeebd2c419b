"""`fluxc refit ENGINE --model CHECKPOINT -o NEW`: a fine-tuned checkpoint of the same architecture becomes an
engine by re-making only the weights, reusing ENGINE's compiled segments.

The build runs as usual up to the weights (load, trace, passes, diffusers eager's reference outputs, the weight
transform: seconds, not the minutes of compilation), with ENGINE's options read back from its manifest. Then a
backend that compiles nothing takes each segment's artifact from ENGINE, after checking that the new graph is the
one it was compiled from (the same ops and the same input and weight shapes), and the build's numerics check runs
on the new weights. A different architecture, family or recipe is refused with the reason, before any work where
the manifest tells, else when the graphs differ. Engines with calibrated static activation scales are refused:
the scales were measured with the old weights.
"""

import os
import shutil

from fluxc import ir
from fluxc.build import Stages, _signing_key, finish, prepare
from fluxc.runtime.core.bundle import read_manifest, verify_files
from fluxc.runtime.core.errors import FluxcError
from fluxc.runtime.core.schema import SEGMENT_FILES
from fluxc.runtime.loaders import LOADERS
from fluxc.validate import BuildOptions, validate


def refit(engine: str, model: str, output: str, sign_key: str | None = None, report=None) -> dict:
    """Write the refitted engine at `output`; returns its manifest."""
    old = read_manifest(engine)
    verify_files(engine, old)
    if old["calibration"] is not None:
        raise FluxcError(f"'{engine}' has static activation scales calibrated on its own weights; they do not hold "
                         "for another checkpoint.", "Build the checkpoint with fluxc build --calibrate instead.")
    opts = _options(old, model, output, sign_key)
    settings = validate(opts)
    if settings.recipe.to_dict() != old["recipe"]:
        raise FluxcError(f"'{engine}' was built with a recipe fluxc's {old['recipe']['name']} no longer matches "
                         "(changed options or another fluxc).", "Build the checkpoint with fluxc build.")
    stages = Stages(report)
    prepared = prepare(opts, settings, stages)
    if prepared.model["family"] != old["model"]["family"] or prepared.model["config"] != old["model"]["config"]:
        differ = sorted(k for k in set(prepared.model["config"]) | set(old["model"]["config"])
                        if prepared.model["config"].get(k) != old["model"]["config"].get(k))
        raise FluxcError(f"'{model}' is not the architecture of '{engine}' (family {prepared.model['family']} vs "
                         f"{old['model']['family']}; config differs in {', '.join(differ) or 'nothing'}).",
                         "Refit only fine-tunes of the engine's model; build other models with fluxc build.")
    prepared.source = {"refit_of": os.path.basename(os.path.normpath(engine)), "cache_key": old["cache_key"]}
    return finish(prepared, settings, opts, stages, _signing_key(opts), backend=_Reuse(engine, old))


def _options(m: dict, model: str, output: str, sign_key: str | None) -> BuildOptions:
    """The options that built the engine with manifest `m`, for `model`."""
    profiles = m["profiles"]
    return BuildOptions(
        model=model, output=output, target=m["target"]["sm"], precision=m["precision"], recipe=m["recipe"]["name"],
        resolutions=tuple((p["height"], p["width"]) for p in profiles), text_tokens=profiles[0]["text_tokens"],
        batch=profiles[0]["batch"], backend=m["backend"]["name"], transformer_only=m["components"] is None,
        encoders=m["components"] and m["components"]["encoders"], cache=m["cache"]["config"],
        world_size=profiles[0]["world_size"], sign_key=sign_key,
        tasks=tuple(m["components"]["tasks"]) if m["components"] else ("t2i",),
        references=max(1, profiles[0]["references"]))


class _Reuse:
    """A backend that compiles nothing: each segment's artifact is copied from the engine being refitted, once the
    new graph is checked to be the one it was compiled from."""

    translates = frozenset()

    def __init__(self, engine: str, manifest: dict):
        self.engine, self.manifest, self.name = engine, manifest, manifest["backend"]["name"]
        self.segments = {s["name"]: s for s in manifest["segments"]}

    def compile(self, gm, example_inputs, out_dir, options):
        name = os.path.basename(out_dir)
        old = self.segments.get(name)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        shapes = [[list(n.meta["val"].shape), str(n.meta["val"].dtype).removeprefix("torch.")] for n in placeholders]
        if old is None or ir.op_counts(gm) != old["op_counts"] or shapes != [
                [s["shape"], s["dtype"]] for s in old["weight_specs"] + old["inputs"]]:
            raise FluxcError(f"Segment {name} of the new checkpoint is not the graph '{self.engine}' compiled (another "
                             "architecture, recipe or fluxc version).", "Build the checkpoint with fluxc build.")
        shutil.copytree(os.path.join(self.engine, old["dir"]), out_dir)
        artifact = f"{old['dir']}/{SEGMENT_FILES[self.name]}"
        return LOADERS[self.name](out_dir, self.manifest["files"][artifact])

    def versions(self):
        return {k: v for k, v in self.manifest["backend"].items() if k != "name"}
