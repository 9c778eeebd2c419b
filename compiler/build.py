"""`fluxc build`: validate options, load, trace, rewrite, compile, check, write the engine atomically."""

import dataclasses
import hashlib
import json
import os
import re
import time
from contextlib import contextmanager

import torch

from fluxc import FORMAT_VERSION, __version__, ir
from fluxc.backends import get_backend
from fluxc.calibrate import calibrate
from fluxc.components import load_components
from fluxc.models import check_source, load_model
from fluxc.numerics import relative_error
from fluxc.passes.base import PassContext
from fluxc.passes.lower_nvfp4 import mode as nvfp4_mode
from fluxc.passes.pipeline import LOWER, resolve, run_pipeline
from fluxc.plan import Prepared, atomic_directory, read_plan, verify_plan, write_plan
from fluxc.recipes import DEFAULT_FOR_PRECISION, RECIPES, Precision, Recipe, recipe_from_dict
from fluxc.runtime.cache import PROBE_SUFFIX
from fluxc.runtime.bundle import (ENCODER_PLACEMENTS, MANIFEST, TOKENIZER_DIR, WEIGHTS, bundle_files, sha256_file,
                                  write_safetensors, write_texts)
from fluxc.runtime.device import local_target, target_device
from fluxc.runtime.errors import FluxcError
from fluxc.runtime.families import FAMILIES, SEGMENT_KINDS
from fluxc.runtime.flux_math import Profile
from fluxc.trace import (COMPONENT_KINDS, component_modules, module_tensors, probe_segment, schedule_segment,
                         segment_modules, trace_components, trace_model)

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
    calibrate: int = 0  # fp8/nvfp4: static activation scales from this many calibration samples (compiler/calibrate.py)
    stage: str = "engine"  # "plan": stop before the target-specific lowering and write a portable plan
    from_plan: str | None = None  # finish this plan (compiler/plan.py) into an engine for the target
    cache: dict | None = None  # CacheConfig fields over the recipe's default step-skipping policy (--cache ...)
    world_size: int = 1  # ranks one image's tokens are split over (context parallelism, runtime/parallel.py)


@dataclasses.dataclass(frozen=True)
class Settings:
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


def validate(opts: BuildOptions) -> Settings:
    """Check target x precision x recipe x shapes in one place, before loading anything."""
    if opts.stage not in ("engine", "plan"):
        raise FluxcError(f"Unknown stage '{opts.stage}'.", "Use --stage engine (the default) or --stage plan.")
    recipe = _recipe(opts)
    here = local_target()
    target = here if opts.target == "auto" else opts.target
    _check_target(recipe, target)
    _check_backend(opts.backend, recipe, bool(opts.calibrate), target)
    if opts.calibrate and recipe.precision not in (Precision.FP8, Precision.NVFP4):
        raise FluxcError(f"--calibrate sets static FP8 or NVFP4 activation scales; this build is "
                         f"{recipe.precision.value}.", "Add --precision fp8 or nvfp4, or drop --calibrate.")
    if opts.calibrate < 0:
        raise FluxcError(f"--calibrate {opts.calibrate}: the number of calibration samples cannot be negative.",
                         "Use --calibrate N with N >= 1 (or leave it out for per-token scales at run time).")
    if target != here and opts.stage != "plan":
        raise FluxcError(
            f"Cannot compile for {target} on this machine ({here}): engines are compiled on the GPU they run on.",
            f"Build on a {target} machine or use --target {here} (or auto); or write a portable plan here with "
            f"--stage plan and finish it on the {target} machine with fluxc build --from PLAN.")
    for h, w in opts.resolutions:
        if h <= 0 or w <= 0 or h % 16 or w % 16:
            raise FluxcError(f"Resolution {h}x{w} is not a positive multiple of 16 in both sides.",
                             f"Use e.g. {max(16, h // 16 * 16)}x{max(16, w // 16 * 16)}: FLUX packs 2x2 latents of 8x8 pixels.")
    if opts.batch < 1:
        raise FluxcError(f"Batch size {opts.batch} is less than 1.", "Use --batch 1 or more.")
    source_kind = check_source(opts.model)
    _check_world_size(opts, recipe)
    encoders = None if opts.transformer_only else _encoder_placement(opts, target, source_kind)
    _check_output(opts.output)
    # traced (and, for an engine, compiled) here: a plan for another target is traced on this machine
    return Settings(recipe, target, target_device(here), TORCH_DTYPES[recipe.precision.activation_dtype], encoders)


def validate_finish(opts: BuildOptions, header: dict) -> Settings:
    """Check that the plan verify_plan read can be finished into an engine for opts.target on this machine."""
    if opts.stage != "engine":
        raise FluxcError("--from finishes a plan into an engine; --stage plan does not apply to it.", "Drop --stage.")
    recipe = recipe_from_dict(header["recipe"])
    here = local_target()
    target = here if opts.target == "auto" else opts.target
    if target != here:
        raise FluxcError(f"Cannot finish a plan for {target} on this machine ({here}): engines are compiled on the "
                         "GPU they run on.", f"Run fluxc build --from on a {target} machine, or use --target {here}.")
    _check_target(recipe, target)
    _check_backend(opts.backend, recipe, header["calibration"] is not None, target)
    device = target_device(target)
    traced = "cuda" if any(s["device"] == "cuda" for s in header["segments"]) else "cpu"
    if traced != device.type:
        raise FluxcError(f"Plan '{opts.from_plan}' was traced on a {traced} machine; it finishes into engines for "
                         f"{traced} targets only, and {target} is not one.",
                         "Write the plan on a machine of the target's kind (a GPU for a GPU target).")
    _check_output(opts.output)
    encoders = header["components"] and header["components"]["encoders"]
    return Settings(recipe, target, device, TORCH_DTYPES[recipe.precision.activation_dtype], encoders)


def _recipe(opts: BuildOptions) -> Recipe:
    try:
        precision = Precision(opts.precision)
    except ValueError:
        raise FluxcError(f"Unknown precision '{opts.precision}'.",
                         "Use one of: " + ", ".join(p.value for p in Precision) + ".") from None
    name = opts.recipe or DEFAULT_FOR_PRECISION[precision]
    if name not in RECIPES:
        raise FluxcError(f"Unknown recipe '{name}'.", "Use one of: " + ", ".join(RECIPES) + ".")
    recipe = RECIPES[name]()
    if opts.recipe_overrides:
        unknown = set(dict(opts.recipe_overrides)) - {f.name for f in dataclasses.fields(Recipe)}
        if unknown:
            raise FluxcError(f"Unknown recipe fields {sorted(unknown)}.", "See fluxc.recipes.Recipe for the fields.")
        recipe = dataclasses.replace(recipe, **dict(opts.recipe_overrides))
    if opts.cache:
        recipe = dataclasses.replace(recipe, cache=recipe.cache.with_overrides(**opts.cache))
    if recipe.precision is not precision:
        raise FluxcError(f"Recipe '{name}' is {recipe.precision.value}, not {precision.value}.",
                         "Drop --precision, or pick a recipe of that precision.")
    return recipe


def _check_target(recipe: Recipe, target: str) -> None:
    """The precision and the recipe's kernels against the target's SM (the CPU target emulates everything)."""
    sm = re.fullmatch(r"sm_(\d+)a?", target)
    sm = int(sm.group(1)) if sm else None
    if recipe.precision is Precision.FP8 and sm is not None and sm < 89:
        raise FluxcError(f"--precision fp8 needs FP8 tensor cores (sm_89 or newer); {target} has none.",
                         "Build --precision bf16 for this GPU, or target an sm_89+ GPU (L40S, H100, H200, B200).")
    if recipe.precision is Precision.NVFP4 and sm is not None and sm < 89:
        raise FluxcError(f"--precision nvfp4 runs natively on sm_100 and newer, and its emulation needs FP8 "
                         f"conversions (sm_89 or newer); {target} has neither.",
                         "Build --precision bf16 for this GPU, or target an sm_89+ GPU.")
    if recipe.fp8_attention and sm is not None and sm < 90:
        raise FluxcError(f"Recipe '{recipe.name}' runs attention through cuDNN's FP8 SDPA, which needs sm_90 or "
                         f"newer; {target} is older.", "Use --recipe sm90_fp8 (FP8 GEMMs, bf16 attention) there.")


def _check_backend(backend: str, recipe: Recipe, calibrated: bool, target: str) -> None:
    import importlib.util

    if backend == "tensorrt" and not importlib.util.find_spec("tensorrt"):
        raise FluxcError("--backend tensorrt: TensorRT (`import tensorrt`) is not installed here.",
                         "Build the stage TensorRT takes with --backend onnx: one checked opset-23 ONNX model per "
                         "segment, FP8 and NVFP4 as TensorRT's Q/DQ patterns; build TensorRT plans from it (or "
                         "rerun with --backend tensorrt) where TensorRT is installed.")
    if backend not in ("inductor", "onnx", "tensorrt"):
        raise FluxcError(f"Unknown backend '{backend}'.", "Use --backend inductor, onnx or tensorrt.")
    if backend == "tensorrt" and target == "cpu":
        raise FluxcError("--backend tensorrt builds plans for the NVIDIA GPU it runs on, not --target cpu.",
                         "Build on the GPU with --target auto, or use --backend onnx for CPU engines.")
    if backend != "inductor" and recipe.precision is Precision.NVFP4 and not calibrated:
        raise FluxcError(f"--backend {backend} exports NVFP4 activations through TensorRT's TRT_FP4DynamicQuantize, "
                         "whose global scale is a build-time constant: it needs calibrated activation scales.",
                         "Add --calibrate N (e.g. 4), or build --precision nvfp4 with --backend inductor.")
    if backend != "inductor" and recipe.fp8_attention:
        raise FluxcError(f"--backend {backend} does not export cuDNN's FP8 attention (recipe {recipe.name}).",
                         "Use --recipe sm90_fp8 (bf16 attention) with ONNX.")


def _check_world_size(opts: BuildOptions, recipe: Recipe) -> None:
    if opts.world_size < 1:
        raise FluxcError(f"--world-size {opts.world_size} is less than 1.", "Use 1 (one GPU) or the number of GPUs.")
    if opts.world_size > 1 and recipe.fp8_attention:
        raise FluxcError(f"--world-size {opts.world_size}: context parallelism does not shard cuDNN's FP8 attention "
                         f"(recipe {recipe.name}).", "Use --recipe sm90_fp8 (FP8 GEMMs, bf16 attention).")


def _check_shards(model, profiles: list[Profile]) -> None:
    """Every rank must get an equal share of the heads, the text tokens and each profile's image tokens."""
    n = profiles[0].world_size
    heads = model.config["num_attention_heads"]
    for what, count in [("attention heads", heads), ("text tokens", profiles[0].text_tokens)] + [
            (f"image tokens at {p.name}", p.image_tokens) for p in profiles]:
        if count % n:
            raise FluxcError(f"--world-size {n} does not divide the model's {count} {what}: every rank takes an "
                             "equal share.", f"Use a world size that divides {count}"
                             + (" (a resolution whose (H/16) x (W/16) it divides)." if "image" in what else "."))


def _rank0_share(name: str, x: torch.Tensor, profile: Profile) -> torch.Tensor:
    """Rank 0's rows of a full-sequence example activation (calibration), for segments traced for one rank."""
    from fluxc.runtime.parallel import shard, shard_joint

    n = profile.world_size
    if n == 1 or x.dim() < 2 or name.startswith("temb"):  # temb, FLUX.2's temb_mod*: per image, not per token
        return x
    if name.startswith("rope"):
        return shard_joint(x, 0, profile.text_tokens, n, 0)
    if name == "joint_hidden_states":
        return shard_joint(x, 1, profile.text_tokens, n, 0)
    return shard(x, 1, n, 0)  # hidden_states, encoder_hidden_states


def _check_output(output: str) -> None:
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise FluxcError(f"Output folder '{parent}' does not exist.", "Create it, or choose another -o path.")


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
    """Build the engine at opts.output (with opts.stage "plan", a portable plan); returns its manifest (or
    plan.json). Nothing is left behind on failure."""
    stages = Stages(report)
    if opts.from_plan:
        header = verify_plan(opts.from_plan)
        settings = validate_finish(opts, header)
        with stages("read plan"):
            prepared = read_plan(opts.from_plan, header, settings.device)
    else:
        settings = validate(opts)
        prepared = prepare(opts, settings, stages)
    if opts.stage == "plan":
        with stages("write plan"):
            return write_plan(prepared, opts.output)
    return finish(prepared, settings, opts, stages)


def prepare(opts: BuildOptions, settings: Settings, stages: Stages) -> Prepared:
    """Load, trace, calibrate, run the portable passes, transform the weights and record diffusers eager's
    outputs for the numerics check: everything before the target-specific lowering."""
    with stages("load"):
        model = load_model(opts.model, dtype=settings.dtype, device=settings.device, seed=opts.seed)
        comps = None
        if settings.encoders is not None:
            comps = load_components(opts.model, model.family, dtype=settings.dtype, device=settings.device,
                                    seed=opts.seed)
            for encoder in comps.encoders.values():
                encoder.to(settings.encoder_device)
    text_tokens = opts.text_tokens or model.default_text_tokens
    profiles = [Profile(h, w, text_tokens, opts.batch, opts.world_size) for h, w in opts.resolutions]
    _check_shards(model, profiles)
    modules = segment_modules(model, profiles[0].local_text_tokens) | (component_modules(comps) if comps else {})
    with stages("trace"):
        segments = trace_model(model, profiles, settings.device, settings.dtype)
        if comps:
            segments += trace_components(comps, profiles, settings.device, settings.dtype, settings.encoder_device)
    calibration, amaxes = None, {}
    if opts.calibrate:
        with stages("calibrate"):
            amaxes, examples, source = calibrate(model, comps, profiles[0], opts.calibrate, settings.device,
                                                 settings.dtype)
            calibration = {"samples": opts.calibrate, "how": source, "linears": len(amaxes)}
            for seg in segments:  # check the first profile's blocks on calibration activations, not noise
                if seg.profile == profiles[0] and seg.kind in examples:
                    b = seg.profile.batch
                    seg.example = {k: _rank0_share(k, v if k.startswith("rope") else v.expand(b, *v.shape[1:]),
                                                   seg.profile).contiguous().to(seg.example[k].dtype)
                                   for k, v in examples[seg.kind].items()}
    pass_counts, explain, reports, schedule, probes = {}, {}, {}, {}, []
    portable = [p for p in resolve(settings.recipe, settings.target) if p.phase != LOWER]
    with stages("passes"):
        for seg in segments:
            ctx = PassContext(settings.recipe, settings.target, seg.kind,
                              FAMILIES[model.family].schedule_inputs.get(seg.kind, ()), bool(amaxes),
                              seg.profile.world_size if seg.kind in SEGMENT_KINDS else 1)  # VAE: whole
            result = run_pipeline(seg.graph, ctx, opts.dump_ir, seg.name, portable)
            seg.graph, pass_counts[seg.name], explain[seg.name] = result.graph, result.counts, result.explain
            reports[seg.name] = result.reports
            if result.hoisted:
                _split_schedule(seg, result.hoisted, schedule)
            if result.probe:
                probes.append(probe_segment(seg, result.probe))
        segments = list(schedule.values()) + segments + probes  # schedules compiled (and run) before the segments they feed
    with stages("reference outputs"):
        for seg in segments:
            if seg.kind in modules:  # a schedule segment is checked with the segment it feeds
                seg.expected = _eager_outputs(modules[seg.kind][0], seg)
    checkpoint = dict(model.module.state_dict()) | amaxes
    for module, (prefix,) in component_modules(comps).values() if comps else ():
        checkpoint.update({f"{prefix}.{n}": t for n, t in module_tensors(module).items()})
    with stages("transform weights"):
        weights = engine_weights(segments, checkpoint)
    del checkpoint
    components, tokenizers = _tokenizers(comps, settings, text_tokens) if comps else (None, {})
    model_entry = {"family": model.family, "config": _jsonable(model.config), "source": model.source}
    return Prepared(settings.recipe, settings.target, model_entry, profiles, segments, weights, components, tokenizers,
                    pass_counts, explain, reports, calibration, dict(stages.seconds))


def finish(p: Prepared, settings: Settings, opts: BuildOptions, stages: Stages) -> dict:
    """Lower for the target, compile, check against the recorded eager outputs, write the engine atomically."""
    backend = get_backend(opts.backend)
    lower = [ps for ps in resolve(p.recipe, settings.target) if ps.phase == LOWER and ps.name not in backend.translates]
    with stages("lower"):
        for seg in p.segments:
            ctx = PassContext(p.recipe, settings.target, seg.kind,
                              FAMILIES[p.model["family"]].schedule_inputs.get(seg.kind, ()))
            result = run_pipeline(seg.graph, ctx, opts.dump_ir, seg.name, lower)
            seg.graph = result.graph
            if seg.name in p.pass_counts:  # schedule segments hold no attention or quantized GEMMs
                p.pass_counts[seg.name] |= result.counts
                p.explain[seg.name] |= result.explain
    with stages("transform weights"):
        weights = engine_weights(p.segments, p.weights)  # the lowering may read new layouts (swizzled scales)
    with atomic_directory(opts.output) as tmp:
        numerics, seg_entries, compiled = {}, [], {}
        for seg in p.segments:
            with stages(f"compile {seg.name}"):
                example = _inputs_for_layer(seg, weights, seg.layers[0])
                compiled[seg.name] = backend.compile(seg.graph, example, os.path.join(tmp, "segments", seg.name),
                                                     dict(p.recipe.inductor_options))
            if seg.expected:
                with stages(f"check {seg.name}"):
                    numerics[seg.name] = _check(compiled, seg, weights, p.recipe)
            seg_entries.append(_segment_entry(seg))
        with stages("write weights"):
            digests = {WEIGHTS: write_safetensors(os.path.join(tmp, WEIGHTS), weights)}
            write_texts(tmp, p.tokenizers)
        with stages("hash"):
            files = {rel: digests.get(rel) or sha256_file(os.path.join(tmp, rel)) for rel in bundle_files(tmp)}
        manifest = _manifest(p, settings, seg_entries, backend, numerics, files, stages.seconds)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
    return manifest


def engine_weights(segments, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor the rewritten segments read, per layer: checkpoint tensors, and the ones passes made
    from them (fused QKV, split projections, quantized forms), from `tensors` (the checkpoint, or a plan's
    weights). Refreshes each segment's weight names from its graph."""
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
                    try:
                        made = src.make(_Prefixed(tensors, prefix))
                    except ValueError as e:  # a weight the format cannot hold (NaN / Inf for NVFP4)
                        raise FluxcError(f"Cannot make {prefix}{src.name}: {e}.",
                                         "Check the checkpoint (it holds values no quantized format can store), or "
                                         "build --precision bf16.") from None
                    weights[prefix + src.name] = made.detach().contiguous()
    return weights


class _Prefixed:
    """One layer's view of a flat tensor dict: name -> tensors[prefix + name]."""

    def __init__(self, tensors: dict, prefix: str):
        self.tensors, self.prefix = tensors, prefix

    def __contains__(self, name: str) -> bool:
        return self.prefix + name in self.tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[self.prefix + name]


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


def _tokenizers(comps, settings: Settings, text_tokens: int) -> tuple[dict, dict[str, str]]:
    """(the manifest's components entry, {tokenizers/<name>.json: its text}) for the `tokenizers` library, and
    what the runtime needs to render, pad and mask prompts as the family's pipeline does (runtime/text.py)."""
    entries, files = {}, {}
    for name, spec in comps.prompt_tokenizers(text_tokens).items():
        rel = f"{TOKENIZER_DIR}/{name}.json"
        files[rel] = spec.pop("tokenizer").to_str()
        entries[name] = {"file": rel, **spec}
    return {"encoders": settings.encoders, "tokenizers": entries}, files


def _windows(seg) -> list[slice]:
    """The schedule rows each check run takes: for a segment with a hoisted schedule part, the first and the
    last window of its rows (they differ: a hoisted graph that mixed rows fails the check)."""
    if seg.schedule is None:
        return [slice(None)]
    b, n = seg.profile.batch, next(iter(seg.schedule.example.values())).shape[0]
    return [slice(0, b), slice(n - b, n)]


def _run_inputs(seg, window: slice, rows: dict) -> dict:
    return seg.example | {k: v[window] for k, v in rows.items()}


@torch.no_grad()
def _eager_outputs(eager_module, seg) -> list[dict[str, torch.Tensor]]:
    """The diffusers module's outputs for each check run (the segment's expected outputs)."""
    names = [k for k in seg.example if seg.schedule is None or k not in seg.schedule.outputs]
    rows = seg.schedule.example if seg.schedule is not None else {}
    runs = []
    for window in _windows(seg):
        acts = _run_inputs(seg, window, rows)
        out = eager_module(*(acts[k] for k in names))
        runs.append(dict(zip(seg.traced_outputs, out if isinstance(out, tuple) else (out,))))
    return runs


@torch.no_grad()
def _check(compiled: dict, seg, weights, recipe) -> dict:
    """Compiled segment vs the eager diffusers module it was traced from (seg.expected), on layer 0's weights.
    A segment with a hoisted schedule part runs after that part's compiled graph."""
    layer0 = _inputs_for_layer(seg, weights, seg.layers[0])[:len(seg.weight_names)]
    rows = {}
    if seg.schedule is not None:
        sched = seg.schedule
        rows = sched.example | dict(zip(sched.outputs, compiled[sched.name](*_inputs_for_layer(sched, weights, seg.layers[0]))))
    errors = {}
    for window, expected in zip(_windows(seg), seg.expected):
        acts = _run_inputs(seg, window, rows)
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


def _manifest(p: Prepared, settings: Settings, seg_entries, backend, numerics, files, seconds) -> dict:
    gpu = torch.cuda.get_device_name(settings.device) if settings.device.type == "cuda" else "cpu"
    shaping = {
        "model": p.model,
        "target": {"sm": settings.target, "device": gpu},
        "precision": p.recipe.precision.value,
        # how the precision runs here: "emulated" for NVFP4 below sm_100 (quantize-dequantize, bf16 GEMMs)
        "precision_mode": nvfp4_mode(settings.target) if p.recipe.precision is Precision.NVFP4 else "native",
        "recipe": p.recipe.to_dict(),
        "passes": [ps.name for ps in resolve(p.recipe, settings.target)],
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


def _jsonable(config: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}
