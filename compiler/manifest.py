"""The engine's manifest.json: what shaped the engine (hashed into its cache key), its segments' I/O, the files'
BLAKE3 digests, build times and numerics."""

import dataclasses
import hashlib
import json
import time

import torch

from fluxc import __version__, ir
from fluxc.passes.lower_nvfp4 import mode as nvfp4_mode
from fluxc.plan import Prepared
from fluxc.recipes import Precision
from fluxc.runtime.core.cache_config import PROBE_SUFFIX
from fluxc.runtime.core.bundle import FORMAT_VERSION
from fluxc.validate import Settings


def segment_entry(seg) -> dict:
    def describe(node):
        v = node.meta["val"]
        return {"name": node.name, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}

    placeholders = [n for n in seg.graph.graph.nodes if n.op == "placeholder"]
    outputs = seg.graph.graph.output_node().args[0]
    return {
        "name": seg.name, "kind": seg.kind, "profile": seg.profile and seg.profile.name, "dir": f"segments/{seg.name}",
        "device": seg.device.type,
        "layers": seg.layers, "weights": seg.weight_names, "schedule": seg.schedule and seg.schedule.name,
        "weight_specs": [describe(n) | {"name": name} for n, name in zip(placeholders, seg.weight_names)],
        # how each weight is made from the checkpoint's tensors (fluxc.ir.WeightSource): adapters and refits read it
        "weight_sources": [dataclasses.asdict(n.meta["weight"]) for n in placeholders[:len(seg.weight_names)]],
        "inputs": [describe(n) | {"name": name} for n, name in zip(placeholders[len(seg.weight_names):], seg.inputs)],
        "outputs": [describe(n) | {"name": name} for n, name in zip(outputs, seg.outputs)],
        "op_counts": ir.op_counts(seg.graph),
    }


def engine_manifest(p: Prepared, settings: Settings, seg_entries, backend, numerics, files, seconds) -> dict:
    gpu = torch.cuda.get_device_name(settings.device) if settings.device.type == "cuda" else "cpu"
    shaping = {
        "model": p.model,
        "target": {"sm": settings.target, "device": gpu},
        "precision": p.recipe.precision.value,
        # how the precision runs here: "emulated" for NVFP4 below sm_100 (quantize-dequantize, bf16 GEMMs)
        "precision_mode": nvfp4_mode(settings.target) if p.recipe.precision is Precision.NVFP4 else "native",
        "recipe": p.recipe.to_dict(),
        "passes": [ps.name for ps in settings.pipeline],
        "backend": {"name": backend.name, **backend.versions()},
        "profiles": [dataclasses.asdict(prof) | {"name": prof.name, "image_tokens": prof.image_tokens}
                     for prof in p.profiles],
        "cache": _cache_points(p),
        "calibration": p.calibration,  # None: FP8 activation scales per token at run time
        "components": p.components,  # None: a transformer-only engine
        "fluxc_version": __version__,
    }
    cache_key = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()
    return {
        "format_version": FORMAT_VERSION, **shaping,
        "pass_counts": p.pass_counts, "pass_explain": p.explain, "pass_reports": p.reports, "segments": seg_entries,
        "files": files, "from_plan": p.source,
        "build_seconds": p.seconds | seconds, "numerics": numerics, "cache_key": cache_key,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cache_points(p: Prepared) -> dict:
    """The manifest's cache section: the default policy, the cut and the probes (passes/insert_cache_points.py)."""
    doubles = [s for s in p.segments if s.kind == "double"]
    probe = next((s for s in p.segments if s.kind == "double" + PROBE_SUFFIX), None)
    points = {"config": p.recipe.cache.to_dict()}
    if doubles:
        points |= {"cut": {"after_kind": "double", "after_layer": doubles[0].layers[0]},
                   "probes": {"residual": "first double block's hidden_states output - input (runtime)",
                              "modulated": probe and probe.kind}}
        if probe is None:
            points["why_no_probe"] = p.explain[doubles[0].name].get("insert_cache_points", "no probe was split off")
    return points


def jsonable(config: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}
