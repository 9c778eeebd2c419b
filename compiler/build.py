"""`fluxc build`: validate options, load, trace, rewrite, compile, check, write the engine atomically."""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager

import torch

from fluxc import FORMAT_VERSION, __version__, ir
from fluxc.backends import get_backend
from fluxc.calibrate import calibrate
from fluxc.components import CLIP_MAX_LENGTH, load_components
from fluxc.models import check_source, load_model
from fluxc.numerics import relative_error
from fluxc.passes.base import PassContext
from fluxc.passes.pipeline import resolve, run_pipeline
from fluxc.recipes import DEFAULT_FOR_PRECISION, RECIPES, Precision, Recipe
from fluxc.runtime.bundle import ENCODER_PLACEMENTS, MANIFEST, TOKENIZER_DIR, WEIGHTS, bundle_files, sha256_file
from fluxc.runtime.device import local_target, target_device
from fluxc.runtime.errors import FluxcError
from fluxc.runtime.flux_math import Profile
from fluxc.trace import (COMPONENT_KINDS, OUTPUTS, SCHEDULE_INPUTS, component_modules, module_tensors,
                         schedule_segment, segment_modules, trace_components, trace_model)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    model: str
    output: str
    target: str = "auto"
    precision: str = "bf16"
    recipe: str | None = None
    resolutions: tuple[tuple[int, int], ...] = ((1024, 1024),)
    text_tokens: int | None = None  # default: the model family's (512 for FLUX.1-dev)
    batch: int = 1
    seed: int = 0
    backend: str = "inductor"
    dump_ir: str | None = None
    transformer_only: bool = False
    encoders: str | None = None  # gpu | offload | cpu; default: gpu on a GPU target, cpu on the CPU target
    recipe_overrides: tuple[tuple[str, object], ...] = ()  # (field, value) over the named recipe (benchmarks)
    calibrate: int = 0  # fp8: static activation scales from this many calibration samples (compiler/calibrate.py)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Validated options: everything a build needs, decided before any work starts."""

    recipe: Recipe
    target: str
    device: torch.device
    dtype: torch.dtype
    encoders: str | None  # where the text encoders live; None for a transformer-only engine

    @property
    def encoder_device(self) -> torch.device:
        return torch.device("cpu") if self.encoders == "cpu" else self.device


def parse_resolution(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise FluxcError(f"Resolution '{text}' is not HEIGHTxWIDTH.", "Write it like 1024x1024.") from None
    return h, w


def validate(opts: BuildOptions) -> Plan:
    """Check target x precision x recipe x shapes in one place, before loading anything."""
    try:
        precision = Precision(opts.precision)
    except ValueError:
        raise FluxcError(f"Unknown precision '{opts.precision}'.",
                         "Use one of: " + ", ".join(p.value for p in Precision) + ".") from None
    name = opts.recipe or DEFAULT_FOR_PRECISION.get(precision)
    if name is None:
        raise FluxcError(f"Precision {precision.value} is not implemented in this fluxc yet.",
                         "Build with --precision bf16 or fp32.")
    if name not in RECIPES:
        raise FluxcError(f"Unknown recipe '{name}'.", "Use one of: " + ", ".join(RECIPES) + ".")
    recipe = RECIPES[name]()
    if opts.recipe_overrides:
        unknown = set(dict(opts.recipe_overrides)) - {f.name for f in dataclasses.fields(Recipe)}
        if unknown:
            raise FluxcError(f"Unknown recipe fields {sorted(unknown)}.", "See fluxc.recipes.Recipe for the fields.")
        recipe = dataclasses.replace(recipe, **dict(opts.recipe_overrides))
    if recipe.precision is not precision:
        raise FluxcError(f"Recipe '{name}' is {recipe.precision.value}, not {precision.value}.",
                         "Drop --precision, or pick a recipe of that precision.")
    here = local_target()
    target = here if opts.target == "auto" else opts.target
    sm = re.fullmatch(r"sm_(\d+)a?", target)
    if precision is Precision.FP8 and sm and int(sm.group(1)) < 89:
        raise FluxcError(f"--precision fp8 needs FP8 tensor cores (sm_89 or newer); {target} has none.",
                         "Build --precision bf16 for this GPU, or target an sm_89+ GPU (L40S, H100, H200, B200).")
    if opts.calibrate and precision is not Precision.FP8:
        raise FluxcError(f"--calibrate sets static FP8 activation scales; this build is {precision.value}.",
                         "Add --precision fp8, or drop --calibrate.")
    if opts.calibrate < 0:
        raise FluxcError(f"--calibrate {opts.calibrate}: the number of calibration samples cannot be negative.",
                         "Use --calibrate N with N >= 1 (or leave it out for per-token scales at run time).")
    if recipe.fp8_attention and sm and int(sm.group(1)) < 90:
        raise FluxcError(f"Recipe '{recipe.name}' runs attention through cuDNN's FP8 SDPA, which needs sm_90 or "
                         f"newer; {target} is older.", "Use --recipe sm90_fp8 (FP8 GEMMs, bf16 attention) there.")
    if target != here:
        raise FluxcError(
            f"Cannot compile for {target} on this machine ({here}): engines are compiled on the GPU they run on.",
            f"Build on a {target} machine, or use --target {here} (or auto).")
    for h, w in opts.resolutions:
        if h <= 0 or w <= 0 or h % 16 or w % 16:
            raise FluxcError(f"Resolution {h}x{w} is not a positive multiple of 16 in both sides.",
                             f"Use e.g. {max(16, h // 16 * 16)}x{max(16, w // 16 * 16)}: FLUX packs 2x2 latents of 8x8 pixels.")
    if opts.batch < 1:
        raise FluxcError(f"Batch size {opts.batch} is less than 1.", "Use --batch 1 or more.")
    source_kind = check_source(opts.model)
    encoders = None if opts.transformer_only else _encoder_placement(opts, target, source_kind)
    parent = os.path.dirname(os.path.abspath(opts.output))
    if not os.path.isdir(parent):
        raise FluxcError(f"Output folder '{parent}' does not exist.", "Create it, or choose another -o path.")
    return Plan(recipe, target, target_device(target), TORCH_DTYPES[precision.activation_dtype], encoders)


def _encoder_placement(opts: BuildOptions, target: str, source_kind: str) -> str:
    if source_kind == "single-file":
        raise FluxcError(f"'{opts.model}' holds a transformer only; a whole-pipeline engine also needs the text "
                         "encoders, tokenizers and VAE of a diffusers FLUX folder.",
                         "Pass the diffusers pipeline folder, or build with --transformer-only.")
    placement = opts.encoders or ("cpu" if target == "cpu" else "gpu")
    if placement not in ENCODER_PLACEMENTS:
        raise FluxcError(f"Unknown encoder placement '{placement}'.", "Use one of: " + ", ".join(ENCODER_PLACEMENTS) + ".")
    if target == "cpu" and placement != "cpu":
        raise FluxcError(f"--encoders {placement} needs a GPU target; this build is for the CPU.",
                         "Drop --encoders (the CPU target keeps everything on the CPU).")
    return placement


class Stages:
    """Times each build stage and reports it to an optional progress callback."""

    def __init__(self, report=None):
        self.seconds: dict[str, float] = {}
        self.report = report or (lambda stage, done: None)

    @contextmanager
    def __call__(self, stage: str):
        self.report(stage, False)
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[stage] = round(time.perf_counter() - start, 3)
        self.report(stage, True)


def build(opts: BuildOptions, report=None) -> dict:
    """Build the engine at opts.output; returns its manifest. Nothing is left behind on failure."""
    plan = validate(opts)
    stages = Stages(report)
    with stages("load"):
        model = load_model(opts.model, dtype=plan.dtype, device=plan.device, seed=opts.seed)
        comps = None
        if plan.encoders is not None:
            comps = load_components(opts.model, model.family, dtype=plan.dtype, device=plan.device, seed=opts.seed)
            for encoder in (comps.clip, comps.t5):
                encoder.to(plan.encoder_device)
    text_tokens = opts.text_tokens or model.default_text_tokens
    profiles = [Profile(h, w, text_tokens, opts.batch) for h, w in opts.resolutions]
    modules = segment_modules(model, text_tokens) | (component_modules(comps) if comps else {})
    with stages("trace"):
        segments = trace_model(model, profiles, plan.device, plan.dtype)
        if comps:
            segments += trace_components(comps, profiles, plan.device, plan.dtype, plan.encoder_device)
    calibration, amaxes = None, {}
    if opts.calibrate:
        with stages("calibrate"):
            amaxes, examples, source = calibrate(model, comps, profiles[0], opts.calibrate, plan.device, plan.dtype)
            calibration = {"samples": opts.calibrate, "how": source, "linears": len(amaxes)}
            for seg in segments:  # check the first profile's blocks on calibration activations, not noise
                if seg.profile == profiles[0] and seg.kind in examples:
                    b = seg.profile.batch
                    seg.example = {k: (v if k.startswith("rope") else v.expand(b, *v.shape[1:]).contiguous())
                                   .to(seg.example[k].dtype) for k, v in examples[seg.kind].items()}
    pass_counts, explain, reports, schedule = {}, {}, {}, {}
    with stages("passes"):
        for seg in segments:
            ctx = PassContext(plan.recipe, plan.target, seg.kind, SCHEDULE_INPUTS.get(seg.kind, ()), bool(amaxes))
            result = run_pipeline(seg.graph, ctx, opts.dump_ir, seg.name)
            seg.graph, pass_counts[seg.name], explain[seg.name] = result.graph, result.counts, result.explain
            reports[seg.name] = result.reports
            if result.hoisted:
                _split_schedule(seg, result.hoisted, schedule)
        segments = list(schedule.values()) + segments  # compiled (and run) before the segments they feed
    checkpoint = dict(model.module.state_dict()) | amaxes
    for kind in COMPONENT_KINDS if comps else ():
        module, (prefix,) = modules[kind]
        checkpoint.update({f"{prefix}.{n}": t for n, t in module_tensors(module).items()})
    with stages("transform weights"):
        weights = engine_weights(segments, checkpoint)
    del checkpoint

    parent = os.path.dirname(os.path.abspath(opts.output))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(opts.output)}.partial-", dir=parent)
    try:
        backend = get_backend(opts.backend)
        numerics, seg_entries, compiled = {}, [], {}
        for seg in segments:
            with stages(f"compile {seg.name}"):
                example = _inputs_for_layer(seg, weights, seg.layers[0])
                compiled[seg.name] = backend.compile(seg.graph, example, os.path.join(tmp, "segments", seg.name),
                                                     dict(plan.recipe.inductor_options))
            if seg.kind in modules:  # a schedule segment is checked with the segment it feeds
                with stages(f"check {seg.name}"):
                    numerics[seg.name] = _check(compiled, modules[seg.kind][0], seg, weights, plan.recipe)
            seg_entries.append(_segment_entry(seg))
        with stages("write weights"):
            from safetensors.torch import save_file

            save_file({k: v.cpu() for k, v in weights.items()}, os.path.join(tmp, WEIGHTS))
            components = _write_tokenizers(comps, plan, text_tokens, tmp) if comps else None
        with stages("hash"):
            files = {rel: sha256_file(os.path.join(tmp, rel)) for rel in bundle_files(tmp)}
        manifest = _manifest(opts, plan, model, profiles, components, seg_entries, pass_counts, explain, reports,
                             backend, numerics, files, stages.seconds, calibration)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        _move_into_place(tmp, opts.output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def engine_weights(segments, checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor the rewritten segments read, per layer: checkpoint tensors, and the ones passes made
    from them (fused QKV, split projections). Refreshes each segment's weight names from its graph."""
    weights, by_kind = {}, {}
    for seg in segments:
        sources = [n.meta["weight"] for n in ir.weight_placeholders(seg.graph)]
        seg.weight_names = [src.name for src in sources]
        if by_kind.setdefault(seg.kind, seg.weight_names) != seg.weight_names:  # the runtime shares them by kind
            raise ir.IRError(f"{seg.name}: the passes gave its weights another layout than another {seg.kind} profile's")
        for layer in seg.layers:
            prefix = f"{layer}." if layer else ""
            for src in sources:
                if prefix + src.name not in weights:
                    weights[prefix + src.name] = src.make(lambda name: checkpoint[prefix + name]).detach().contiguous()
    return weights


def _split_schedule(seg, hoisted, schedule: dict) -> None:
    """Make the schedule segment hoist_schedule split off `seg` (one per kind: every profile's is the same
    graph), and example values for the inputs it gave `seg`."""
    made = schedule_segment(seg, hoisted)
    first = schedule.setdefault(made.kind, made)
    if ir.dump(first.graph) != ir.dump(made.graph):
        raise ir.IRError(f"{seg.name}: its hoisted graph differs from another profile's")
    seg.schedule = first
    for node in seg.graph.graph.nodes:
        if node.op == "placeholder" and node.name in hoisted.values:
            v = node.meta["val"]
            seg.example[node.name] = torch.randn(v.shape, dtype=v.dtype, device=seg.device)


def _inputs_for_layer(seg, weights, layer) -> list[torch.Tensor]:
    prefix = f"{layer}." if layer else ""
    return [weights[prefix + w] for w in seg.weight_names] + [seg.example[n] for n in seg.inputs]


def _write_tokenizers(comps, plan, text_tokens: int, root: str) -> dict:
    """tokenizers/<name>.json for the `tokenizers` library, and what the runtime needs to pad them as FLUX does."""
    os.makedirs(os.path.join(root, TOKENIZER_DIR))
    tokenizers = {}
    for name, tok, max_length in (("clip", comps.clip_tokenizer, CLIP_MAX_LENGTH), ("t5", comps.t5_tokenizer, text_tokens)):
        rel = f"{TOKENIZER_DIR}/{name}.json"
        tok.tokenizer.save(os.path.join(root, rel))
        tokenizers[name] = {"file": rel, "max_length": max_length, "pad_id": tok.pad_id, "pad_token": tok.pad_token}
    return {"encoders": plan.encoders, "tokenizers": tokenizers, "vae": comps.vae_factors}


@torch.no_grad()
def _check(compiled: dict, eager_module, seg, weights, recipe) -> dict:
    """Compiled segment vs the eager diffusers module it was traced from, on layer 0's weights.

    A segment with a hoisted schedule part runs after that part's compiled graph, on two windows of its
    rows (the first and the last, which differ): a hoisted graph that mixed rows would fail here."""
    layer0 = _inputs_for_layer(seg, weights, seg.layers[0])[:len(seg.weight_names)]
    runs = [dict(seg.example)]
    if seg.schedule is not None:
        sched = seg.schedule
        rows = compiled[sched.name](*_inputs_for_layer(sched, weights, seg.layers[0]))
        by_row = sched.example | dict(zip(sched.outputs, rows))
        b, n = seg.profile.batch, next(iter(sched.example.values())).shape[0]
        runs = [seg.example | {k: v[lo:lo + b] for k, v in by_row.items()} for lo in (0, n - b)]
    eager_inputs = [k for k in seg.example if seg.schedule is None or k not in seg.schedule.outputs]
    errors = {}
    for acts in runs:
        expected = eager_module(*(acts[k] for k in eager_inputs))
        expected = dict(zip(OUTPUTS[seg.kind], expected if isinstance(expected, tuple) else (expected,)))
        got = acts | dict(zip(seg.outputs, compiled[seg.name](*layer0, *(acts[k] for k in seg.inputs))))
        for name, want in expected.items():  # a hoisted output (the head's temb) comes from the schedule rows
            errors[name] = max(errors.get(name, 0.0), relative_error(got[name], want))
    worst = max(errors.values())
    rtol = recipe.component_check_rtol if seg.kind in COMPONENT_KINDS and recipe.component_check_rtol else recipe.check_rtol
    if not worst <= rtol:
        raise RuntimeError(f"numerics check failed for {seg.name}: relative errors {errors} exceed {rtol} (compiler bug)")
    return {"max_relative_error": worst, "tolerance": rtol, "by_output": errors}


def _segment_entry(seg) -> dict:
    def describe(node):
        v = node.meta["val"]
        return {"name": node.name, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}

    placeholders = [n for n in seg.graph.graph.nodes if n.op == "placeholder"]
    outputs = seg.graph.graph.output_node().args[0]
    return {
        "name": seg.name, "kind": seg.kind, "profile": seg.profile and seg.profile.name, "dir": f"segments/{seg.name}",
        "device": seg.device.type,
        "layers": seg.layers, "weights": seg.weight_names, "schedule": seg.schedule and seg.schedule.name,
        "inputs": [describe(n) | {"name": name} for n, name in zip(placeholders[len(seg.weight_names):], seg.inputs)],
        "outputs": [describe(n) | {"name": name} for n, name in zip(outputs, seg.outputs)],
        "op_counts": ir.op_counts(seg.graph),
    }


def _manifest(opts, plan, model, profiles, components, seg_entries, pass_counts, explain, reports, backend,
              numerics, files, seconds, calibration) -> dict:
    gpu = torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else "cpu"
    shaping = {
        "model": {"family": model.family, "config": _jsonable(model.config), "source": model.source},
        "target": {"sm": plan.target, "device": gpu},
        "precision": plan.recipe.precision.value,
        "recipe": plan.recipe.to_dict(),
        "passes": [p.name for p in resolve(plan.recipe, plan.target)],
        "backend": {"name": backend.name, **backend.versions()},
        "profiles": [dataclasses.asdict(p) | {"name": p.name, "image_tokens": p.image_tokens} for p in profiles],
        "cache": {"mode": "none"},
        "calibration": calibration,  # None: FP8 activation scales per token at run time
        "components": components,  # None: a transformer-only engine
        "fluxc_version": __version__,
    }
    cache_key = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()
    return {
        "format_version": FORMAT_VERSION, **shaping,
        "pass_counts": pass_counts, "pass_explain": explain, "pass_reports": reports, "segments": seg_entries,
        "files": files,
        "build_seconds": seconds, "numerics": numerics, "cache_key": cache_key,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _jsonable(config: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}


def _move_into_place(tmp: str, output: str) -> None:
    """Rename the finished bundle into place; an existing engine there is replaced only now."""
    if os.path.exists(output):
        old = tmp + ".old"
        os.rename(output, old)
        os.rename(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, output)
