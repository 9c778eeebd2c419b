"""Portable plans: a build stopped before its target-specific lowering (`fluxc build --stage plan`) and
finished on the target by `fluxc build --from PLAN`.

A plan is a directory (`*.fluxp`, written atomically like an engine):
    plan.json            format version, model, target, recipe, profiles, components, pass counts and reports,
                         each segment's rewritten graph (ir.to_json) and how the runtime feeds it, and the
                         BLAKE3 digest of every other file
    weights.safetensors  the transformed weights (packed NVFP4, e4m3, fused QKV ...), per layer
    checks.safetensors   each segment's example inputs and diffusers eager's outputs on them: the finished
                         engine's numerics check, without the model
    tokenizers/          the tokenizer.json files of a whole-pipeline plan
Nothing in a plan is pickled; the graphs are JSON over aten (and fluxc) operator names.
"""

import dataclasses
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager

import torch

from fluxc import __version__, ir
from fluxc.recipes import Recipe, recipe_from_dict
from fluxc.runtime.core.bundle import file_digest, write_safetensors, write_texts
from fluxc.runtime.core.errors import FluxcError
from fluxc.runtime.core.profile import Profile
from fluxc.frontend.trace import Segment

PLAN_FORMAT = 3  # 2: BLAKE3 file digests; 3: checkpoint tensor shapes in the weight sources
PLAN_JSON, WEIGHTS, CHECKS = "plan.json", "weights.safetensors", "checks.safetensors"


@dataclasses.dataclass
class Prepared:
    """A build up to the target-specific lowering: what a plan holds, and what finishing an engine needs."""

    recipe: Recipe
    target: str  # the target the plan was made for
    model: dict  # family, config, source
    profiles: list[Profile]
    segments: list[Segment]  # schedule segments first; graphs after the portable passes; examples, expected outputs
    weights: dict[str, torch.Tensor]  # every tensor the segments read, per layer prefix
    components: dict | None  # encoders placement, tokenizer files, VAE factors; None: transformer-only
    tokenizers: dict[str, str]  # relative path -> tokenizer.json text
    pass_counts: dict
    explain: dict
    reports: dict
    calibration: dict | None
    seconds: dict[str, float]  # the preparing stages' times
    source: dict | None = None  # {"plan": path, "plan_json_digest": ...} when finished from a plan


@contextmanager
def atomic_directory(output: str):
    """Yield a temporary directory beside `output`, renamed into place when the block succeeds (an existing
    directory there is replaced only then); removed on any failure, Ctrl-C and SIGTERM (a `timeout` or a job
    scheduler stopping the build) included."""
    parent = os.path.dirname(os.path.abspath(output))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.partial-", dir=parent)
    with _terminate_raises() as raise_if_stopped, _cleaned_up(tmp):
        yield tmp
        raise_if_stopped()
        if os.path.exists(output):
            old = tmp + ".old"
            os.rename(output, old)
            os.rename(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, output)


@contextmanager
def _cleaned_up(tmp: str):
    try:
        yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def _terminate_raises():
    """SIGTERM raises SystemExit (exit code 143) inside the block, so that cleanup runs; by default it kills the
    process on the spot. Only the main thread can set signal handlers; elsewhere the block runs as is. Yields a
    function that raises it again where the first was lost: a handler's exception is ignored when the signal lands
    in a __del__ that garbage collection runs (seen: regex's Group.__del__ during a build), and the block goes on."""
    received = []

    def raise_if_stopped():
        if received:
            raise SystemExit(128 + received[0])

    if threading.current_thread() is not threading.main_thread():
        yield raise_if_stopped
        return

    def stop(signum, frame):
        received.append(signum)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield raise_if_stopped
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_plan(p: Prepared, output: str) -> dict:
    """Write the plan directory; returns its plan.json."""
    checks = {}
    for seg in p.segments:
        checks |= {f"{seg.name}/example/{k}": v for k, v in seg.example.items()}
        for i, outputs in enumerate(seg.expected):
            checks |= {f"{seg.name}/expected/{i}/{k}": v for k, v in outputs.items()}
    with atomic_directory(output) as tmp:
        digests = {WEIGHTS: write_safetensors(os.path.join(tmp, WEIGHTS), p.weights),
                   CHECKS: write_safetensors(os.path.join(tmp, CHECKS), checks)}
        write_texts(tmp, p.tokenizers)
        header = {
            "format": "fluxc-plan", "format_version": PLAN_FORMAT, "fluxc_version": __version__,
            "torch": torch.__version__, "target": p.target, "precision": p.recipe.precision.value,
            "recipe": p.recipe.to_dict(), "model": p.model,
            "profiles": [dataclasses.asdict(prof) for prof in p.profiles], "components": p.components,
            "calibration": p.calibration, "pass_counts": p.pass_counts, "pass_explain": p.explain,
            "pass_reports": p.reports, "build_seconds": p.seconds,
            "segments": [_segment_entry(seg) for seg in p.segments],
            "files": digests | {rel: file_digest(os.path.join(tmp, rel)) for rel in p.tokenizers},
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with open(os.path.join(tmp, PLAN_JSON), "w") as f:
            json.dump(header, f)
    return header


def _segment_entry(seg: Segment) -> dict:
    return {"kind": seg.kind, "profile": seg.profile and dataclasses.asdict(seg.profile), "layers": seg.layers,
            "weights": seg.weight_names, "schedule": seg.schedule and seg.schedule.name,
            "device": seg.device.type, "example": list(seg.example), "checks": len(seg.expected),
            "graph": ir.to_json(seg.graph)}


def verify_plan(path: str) -> dict:
    """plan.json of the plan at `path`, after checking its format and every file's digest; FluxcError if not."""
    remedy = "Write the plan again with fluxc build --stage plan."
    manifest = os.path.join(path, PLAN_JSON)
    if not os.path.isfile(manifest):
        raise FluxcError(f"'{path}' is not a fluxc plan (no {PLAN_JSON}).", "Pass the directory --stage plan wrote.")
    try:
        with open(manifest) as f:
            header = json.load(f)
    except (OSError, ValueError) as e:
        raise FluxcError(f"{manifest} is unreadable: {e}", remedy) from None
    if header.get("format") != "fluxc-plan" or header.get("format_version") != PLAN_FORMAT:
        raise FluxcError(f"'{path}' has plan format {header.get('format_version')}; this fluxc reads {PLAN_FORMAT}.",
                         remedy)
    for rel, digest in header["files"].items():
        file = os.path.join(path, rel)
        if not os.path.isfile(file) or file_digest(file) != digest:
            raise FluxcError(f"Plan file {rel} is missing or changed since the plan was written (digest mismatch).",
                             remedy)
    return header


def read_plan(path: str, header: dict, device: torch.device) -> Prepared:
    """The plan verify_plan checked, its tensors on `device` (segments traced on the CPU stay there)."""
    from safetensors.torch import load_file

    weights = load_file(os.path.join(path, WEIGHTS))
    checks = load_file(os.path.join(path, CHECKS))
    segments: dict[str, Segment] = {}
    for entry in header["segments"]:
        dev = torch.device("cpu") if entry["device"] == "cpu" else device
        profile = entry["profile"] and Profile(**entry["profile"])
        seg = Segment(entry["kind"], profile, ir.from_json(entry["graph"], dev), entry["weights"], entry["layers"],
                      schedule=segments.get(entry["schedule"]))
        seg.example = {k: checks[f"{seg.name}/example/{k}"].to(dev) for k in entry["example"]}
        seg.expected = [{k.split("/")[-1]: v.to(dev) for k, v in checks.items() if k.startswith(f"{seg.name}/expected/{i}/")}
                        for i in range(entry["checks"])]
        ir.verify(seg.graph, f"plan segment {seg.name}")
        for layer in seg.layers:  # weights live with the segments that read them
            prefix = f"{layer}." if layer else ""
            for name in seg.weight_names:
                weights[prefix + name] = weights[prefix + name].to(dev)
        segments[seg.name] = seg
    tokenizers = {}
    for rel in header["files"]:
        if rel not in (WEIGHTS, CHECKS):
            with open(os.path.join(path, rel)) as f:
                tokenizers[rel] = f.read()
    digest = file_digest(os.path.join(path, PLAN_JSON))
    return Prepared(recipe_from_dict(header["recipe"]), header["target"], header["model"],
                    [Profile(**prof) for prof in header["profiles"]], list(segments.values()), weights,
                    header["components"], tokenizers, header["pass_counts"], header["pass_explain"],
                    header["pass_reports"], header["calibration"], header["build_seconds"],
                    source={"plan": os.path.basename(os.path.abspath(path)), "plan_json_digest": digest})
