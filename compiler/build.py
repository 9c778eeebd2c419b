"""`fluxc build`: one straight line, each step once.

    validate (fluxc.validate)    options -> Settings: target x precision x recipe x shapes x output, the pass list
    prepare                      load the model (and text encoders, VAE), trace each segment, calibrate
    passes                       the portable passes; side graphs (schedule, probe) become their own segments
    reference                    diffusers eager's outputs on each segment's example inputs
    weights (fluxc.weights)      every tensor the rewritten segments read, made once per layer
      -- a plan (--stage plan) is written here; --from PLAN starts here --
    lower                        the target's passes (attention kernel, NVFP4 native or emulated)
    compile / check / write      each segment compiled, checked against the reference (fluxc.check), the engine
                                 written atomically with its manifest (fluxc.manifest)
"""

import json
import os
import time
from contextlib import contextmanager

import torch

from fluxc import ir
from fluxc.backends import get_backend
from fluxc.calibrate import calibrate
from fluxc.check import check_segment, eager_outputs
from fluxc.frontend.components import load_components
from fluxc.frontend.models import load_model
from fluxc.frontend.trace import (component_modules, module_tensors, probe_segment, schedule_segment, segment_modules,
                                  trace_components, trace_model)
from fluxc.manifest import engine_manifest, jsonable, segment_entry
from fluxc.passes.base import PassContext
from fluxc.passes.pipeline import LOWER, run_pipeline
from fluxc.plan import Prepared, atomic_directory, read_plan, verify_plan, write_plan
from fluxc.runtime.core.bundle import (MANIFEST, TOKENIZER_DIR, WEIGHTS, bundle_files, file_digest, write_safetensors,
                                      sign_engine, write_seal, write_texts)
from fluxc.runtime.core.errors import FluxcError
from fluxc.runtime.core.families import FAMILIES, SEGMENT_KINDS
from fluxc.runtime.core.profile import Profile
from fluxc.runtime.core.signing import load_private_key
from fluxc.validate import BuildOptions, Settings, check_shards, validate, validate_finish
from fluxc.weights import engine_weights, layer_inputs

__all__ = ["BuildOptions", "build"]


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
    key = _signing_key(opts)
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
    return finish(prepared, settings, opts, stages, key)


def _signing_key(opts: BuildOptions):
    """The private key to sign the engine with, read before any work (a bad key fails in a second, not an hour)."""
    if opts.sign_key is None:
        return None
    if opts.stage == "plan":
        raise FluxcError("Plans are not signed: only engines are (their segments are code; a plan holds none).",
                         "Drop --sign-key here and pass it to fluxc build --from PLAN, or sign the engine after.")
    return load_private_key(opts.sign_key)


def prepare(opts: BuildOptions, settings: Settings, stages: Stages) -> Prepared:
    """Everything before the target-specific lowering: load, trace, calibrate, the portable passes, diffusers
    eager's reference outputs, the transformed weights."""
    with stages("load"):
        model, comps = _load(opts, settings)
    text_tokens = opts.text_tokens or model.default_text_tokens
    references = 1 if "kontext" in opts.tasks else opts.references if "references" in opts.tasks else 0
    profiles = [Profile(h, w, text_tokens, opts.batch, opts.world_size, references) for h, w in opts.resolutions]
    check_shards(model, profiles)
    with stages("trace"):
        segments = trace_model(model, profiles, settings.device, settings.dtype)
        if comps:
            segments += trace_components(comps, profiles, settings.device, settings.dtype, settings.encoder_device,
                                         opts.tasks)
    calibration, amaxes = None, {}
    if opts.calibrate:
        with stages("calibrate"):
            amaxes, source = _calibrate(model, comps, profiles[0], segments, opts.calibrate, settings)
            calibration = {"samples": opts.calibrate, "how": source, "linears": len(amaxes)}
    family = FAMILIES[model.family]
    with stages("passes"):
        segments, counts, explain, reports = _portable_passes(segments, family, settings, bool(amaxes), opts.dump_ir)
    with stages("reference outputs"):
        modules = segment_modules(model, profiles[0].local_text_tokens) | (component_modules(comps, opts.tasks)
                                                                              if comps else {})
        for seg in segments:
            if seg.kind in modules:  # a schedule segment is checked with the segment it feeds
                seg.expected = eager_outputs(modules[seg.kind][0], seg)
    with stages("transform weights"):
        checkpoint = _checkpoint(model, comps, opts.tasks) | amaxes
        model.module.to_empty(device="meta")  # the checkpoint holds the only references now: freed layer by layer
        weights = engine_weights(segments, checkpoint, release=True)
    components, tokenizers = _tokenizers(comps, settings, text_tokens) if comps else (None, {})
    if components is not None:
        components["tasks"] = list(opts.tasks)
    model_entry = {"family": model.family, "config": jsonable(model.config), "source": model.source}
    return Prepared(settings.recipe, settings.target, model_entry, profiles, segments, weights, components, tokenizers,
                    counts, explain, reports, calibration, dict(stages.seconds))


def _load(opts: BuildOptions, settings: Settings):
    """The transformer (FluxModel), and the text encoders and VAE (Components; None for --transformer-only)."""
    model = load_model(opts.model, dtype=settings.dtype, device=settings.device, seed=opts.seed)
    if settings.encoders is None:
        return model, None
    fill = model.config["in_channels"] != (model.config["out_channels"] or model.config["in_channels"])
    if fill != (tuple(opts.tasks) == ("fill",)):
        raise FluxcError(f"'{opts.model}' is " + ("a FLUX.1 Fill model: it takes an image and a mask, always."
                                                  if fill else "not a FLUX.1 Fill model (its transformer takes "
                                                  "latents only), so --tasks fill does not apply."),
                         "Build Fill models with --tasks fill, and other models with t2i (and img2img, inpaint).")
    wanted = {"kontext": "flux1", "references": "flux2"}.get(opts.tasks[0])
    if wanted and model.family != wanted:
        raise FluxcError(f"--tasks {opts.tasks[0]} is for {wanted} models; '{opts.model}' is {model.family}.",
                         "Use --tasks kontext for FLUX.1 (Kontext) and --tasks references for FLUX.2.")
    if len(opts.tasks) > 1 and model.family != "flux1":
        raise FluxcError(f"--tasks {','.join(opts.tasks)}: image input is built for FLUX.1 so far; '{opts.model}' is "
                         f"{model.family}.",
                         "Build it with --tasks t2i.")
    comps = load_components(opts.model, model.family, dtype=settings.dtype, device=settings.device, seed=opts.seed)
    for encoder in comps.encoders.values():
        encoder.to(settings.encoder_device)
    return model, comps


def _calibrate(model, comps, profile: Profile, segments, samples: int, settings: Settings) -> tuple[dict, str]:
    """Static activation amaxes from `samples` calibration prompts; the first profile's blocks are then checked on
    calibration activations instead of noise. Returns the amaxes (checkpoint entries) and where prompts came from."""
    amaxes, examples, source = calibrate(model, comps, profile, samples, settings.device, settings.dtype)
    for seg in segments:
        if seg.profile == profile and seg.kind in examples:
            b = seg.profile.batch
            seg.example = {k: _rank0_share(k, v if k.startswith("rope") else v.expand(b, *v.shape[1:]),
                                           seg.profile).contiguous().to(seg.example[k].dtype)
                           for k, v in examples[seg.kind].items()}
    return amaxes, source


def _portable_passes(segments, family, settings: Settings, calibrated: bool, dump_ir: str | None):
    """Run the passes before the lowering on every segment; the graphs they split off (hoist_schedule's schedule,
    insert_cache_points' probe) become segments of their own. Returns (segments, schedules first; counts, explain,
    reports by segment)."""
    portable = [p for p in settings.pipeline if p.phase != LOWER]
    counts, explain, reports, schedule, probes = {}, {}, {}, {}, []
    for seg in segments:
        ctx = PassContext(settings.recipe, settings.target, seg.kind, family.schedule_inputs.get(seg.kind, ()),
                          calibrated, seg.profile.world_size if seg.kind in SEGMENT_KINDS else 1)  # VAE: whole
        result = run_pipeline(seg.graph, ctx, dump_ir, seg.name, portable)
        seg.graph, counts[seg.name], explain[seg.name] = result.graph, result.counts, result.explain
        reports[seg.name] = result.reports
        if "schedule" in result.side:
            _split_schedule(seg, result.side["schedule"], schedule)
        if "probe" in result.side:
            probes.append(probe_segment(seg, result.side["probe"]))
    return list(schedule.values()) + segments + probes, counts, explain, reports  # schedules run before their users


def _checkpoint(model, comps, tasks) -> dict[str, torch.Tensor]:
    """Every tensor of the model (and components) by its diffusers pipeline-folder name."""
    checkpoint = dict(model.module.state_dict())
    for module, (prefix,) in component_modules(comps, tasks).values() if comps else ():
        checkpoint.update({f"{prefix}.{n}": t for n, t in module_tensors(module).items()})
    return checkpoint


def finish(p: Prepared, settings: Settings, opts: BuildOptions, stages: Stages, key=None, backend=None) -> dict:
    """Lower for the target, compile, check against the recorded eager outputs, write the engine atomically.
    backend: default opts.backend's (fluxc.refit passes one that reuses an engine's compiled segments)."""
    backend = backend or get_backend(opts.backend)
    lower = [ps for ps in settings.pipeline if ps.phase == LOWER and ps.name not in backend.translates]
    family = FAMILIES[p.model["family"]]
    with stages("lower"):
        for seg in p.segments:
            ctx = PassContext(p.recipe, settings.target, seg.kind, family.schedule_inputs.get(seg.kind, ()))
            result = run_pipeline(seg.graph, ctx, opts.dump_ir, seg.name, lower)
            seg.graph = result.graph
            if seg.name in p.pass_counts:  # schedule segments hold no attention or quantized GEMMs
                p.pass_counts[seg.name] |= result.counts
                p.explain[seg.name] |= result.explain
        weights = engine_weights(p.segments, p.weights)  # made already, but the tensors the lowering added (swizzled scales)
    with atomic_directory(opts.output) as tmp:
        numerics, seg_entries, compiled = {}, [], {}
        for seg in p.segments:
            with stages(f"compile {seg.name}"):
                example = layer_inputs(seg, weights, seg.layers[0])
                compiled[seg.name] = backend.compile(seg.graph, example, os.path.join(tmp, "segments", seg.name),
                                                     dict(p.recipe.inductor_options))
            if seg.expected:
                with stages(f"check {seg.name}"):
                    numerics[seg.name] = check_segment(compiled, seg, weights, p.recipe)
            seg_entries.append(segment_entry(seg))
        with stages("write weights"):
            digests = {WEIGHTS: write_safetensors(os.path.join(tmp, WEIGHTS), weights)}
            write_texts(tmp, p.tokenizers)
        with stages("hash"):
            files = {rel: digests.get(rel) or file_digest(os.path.join(tmp, rel)) for rel in bundle_files(tmp)}
        manifest = engine_manifest(p, settings, seg_entries, backend, numerics, files, stages.seconds)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        write_seal(tmp)
        if key is not None:
            sign_engine(tmp, key)
    return manifest


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


def _tokenizers(comps, settings: Settings, text_tokens: int) -> tuple[dict, dict[str, str]]:
    """(the manifest's components entry, {tokenizers/<name>.json: its text}) for the `tokenizers` library, and
    what the runtime needs to render, pad and mask prompts as the family's pipeline does (runtime/text.py)."""
    entries, files = {}, {}
    for name, spec in comps.prompt_tokenizers(text_tokens).items():
        rel = f"{TOKENIZER_DIR}/{name}.json"
        files[rel] = spec.pop("tokenizer").to_str()
        entries[name] = {"file": rel, **spec}
    return {"encoders": settings.encoders, "tokenizers": entries}, files
