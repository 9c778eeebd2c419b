"""The manifest's structure, checked before the runtime reads any of it.

The digests and signatures say whether an engine is the one that was built; this says whether what it holds is
something this runtime can run. Every field the runtime or `fluxc inspect` reads is checked for its type and
range, and the fields that must agree are checked against each other (a segment's profile exists, its artifact
is a listed file, every profile has its transformer segments, a tokenizer's file is listed), so that a manifest
damaged or edited in a way the digests do not catch (re-hashed unsigned engines) is a FluxcError with a remedy
rather than a KeyError or an assertion deep in a load. What only the weights file and the compiled artifacts can
say (a tensor's shape, an artifact's expected inputs) is checked where those are read (Engine._load_weights,
Engine.run_segment).
"""

import re

from fluxc.runtime.core.errors import FluxcError

SEGMENT_FILES = {"inductor": "artifact.bin", "onnx": "segment.onnx", "tensorrt": "segment.plan"}  # backend -> its file
ENCODER_PLACEMENTS = ("gpu", "offload", "cpu")  # resident on the GPU | parked in CPU memory between prompts | run on the CPU
REBUILD = "Rebuild the engine or copy it again whole; never edit engine files by hand."
PRECISIONS = ("fp32", "bf16", "fp8", "nvfp4")
DEVICES = ("cpu", "cuda")
SIDES = ("left", "right")
TASKS = ("t2i", "img2img", "inpaint", "fill", "kontext", "references")  # what an engine does (components.tasks)
# tasks an engine does by itself: FLUX.1 Fill; FLUX.1 Kontext and FLUX.2 reference editing (profiles with references)
ALONE = ("fill", "kontext", "references")
IMAGE_TASKS = ALONE + ("img2img", "inpaint")  # the tasks that take an image: the VAE encoder is compiled
TENSOR_DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int64", "int32", "int16", "int8",
                 "uint8", "bool", "float64")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TRANSFORMER = ("head", "double", "single", "tail")


class _Damaged(Exception):
    pass


def check_manifest(m) -> None:
    """FluxcError naming the first field that is missing, mistyped or inconsistent."""
    try:
        _check(m)
    except _Damaged as e:
        raise FluxcError(f"The engine's manifest is damaged: {e}.", REBUILD) from None


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise _Damaged(what)


def _get(d, key: str, kind, where: str):
    """d[key] if d is a dict holding a value of `kind` there (bool is not an int here)."""
    _need(isinstance(d, dict) and key in d, f"{where} has no '{key}'")
    value = d[key]
    ok = isinstance(value, kind) and not (kind in (int, (int, float)) and isinstance(value, bool))
    _need(ok, f"{where}.{key} is {type(value).__name__}, not {_kind_name(kind)}")
    return value


def _kind_name(kind) -> str:
    return " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__


def _positive(d, key: str, where: str) -> int:
    value = _get(d, key, int, where)
    _need(value >= 1, f"{where}.{key} is {value}, not a positive integer")
    return value


def _strings(d, key: str, where: str, nonempty: bool = False) -> list:
    values = _get(d, key, list, where)
    _need(all(isinstance(v, str) for v in values), f"{where}.{key} holds a non-string")
    _need(not nonempty or values, f"{where}.{key} is empty")
    return values


def _check(m) -> None:
    _need(isinstance(m, dict), "it is not a JSON object")
    for key in ("fluxc_version", "precision_mode", "cache_key"):
        _get(m, key, str, "manifest")
    _need(_get(m, "precision", str, "manifest") in PRECISIONS, f"unknown precision {m['precision']!r}")
    _strings(m, "passes", "manifest")
    _get(_get(m, "recipe", dict, "manifest"), "name", str, "recipe")
    for key in ("sm", "device"):
        _get(_get(m, "target", dict, "manifest"), key, str, "target")
    backend = _get(m, "backend", dict, "manifest")
    for key in ("name", "torch", "triton", "cuda", "cudnn"):
        _get(backend, key, str, "backend")
    _need(backend["name"] in SEGMENT_FILES, f"unknown backend {backend['name']!r}")
    for section in ("numerics", "build_seconds"):
        _get(m, section, dict, "manifest")
    _need(all(isinstance(v, (int, float)) for v in m["build_seconds"].values()), "build_seconds holds a non-number")
    for name, check in m["numerics"].items():
        _get(check, "max_relative_error", (int, float), f"numerics.{name}")

    files = _get(m, "files", dict, "manifest")
    for rel, digest in files.items():
        _need(_safe_path(rel), f"file name {rel!r} is not a plain relative path")
        _need(isinstance(digest, str) and _HEX64.fullmatch(digest) is not None, f"the digest of {rel} is malformed")

    family = _check_model(m)
    profiles = _check_profiles(m)
    _check_cache(m)
    _check_segments(m, family, profiles, files)
    _check_components(m, family, files)


def _safe_path(rel) -> bool:
    parts = rel.split("/") if isinstance(rel, str) else []
    return bool(parts) and not rel.startswith("/") and "\\" not in rel and all(p not in ("", ".", "..") for p in parts)


def _check_model(m):
    from fluxc.runtime.core.families import FAMILIES

    model = _get(m, "model", dict, "manifest")
    name = _get(model, "family", str, "model")
    _need(name in FAMILIES, f"unknown model family {name!r}")
    _need("source" in model, "model has no 'source'")
    config = _get(model, "config", dict, "model")
    for key in ("in_channels", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                "joint_attention_dim") + (("pooled_projection_dim",) if FAMILIES[name].pooled else ()):
        _positive(config, key, "model.config")
    _get(config, "guidance_embeds", bool, "model.config")
    axes = _get(config, "axes_dims_rope", list, "model.config")
    _need(len(axes) == FAMILIES[name].rope_axes and all(isinstance(a, int) and a > 0 and a % 2 == 0
                                                                 for a in axes)
          and sum(axes) == config["attention_head_dim"], f"model.config.axes_dims_rope {axes} does not fit the model")
    if name == "flux2":
        _need(_get(config, "rope_theta", (int, float), "model.config") > 0, "model.config.rope_theta is not positive")
    return FAMILIES[name]


def _check_profiles(m) -> dict:
    profiles = _get(m, "profiles", list, "manifest")
    _need(bool(profiles), "it lists no profiles")
    out = {}
    for i, p in enumerate(profiles):
        where = f"profiles[{i}]"
        h, w = _positive(p, "height", where), _positive(p, "width", where)
        for key in ("text_tokens", "batch", "world_size"):
            _positive(p, key, where)
        _need(_get(p, "references", int, where) >= 0, f"{where}.references is negative")
        _need(h % 16 == 0 and w % 16 == 0, f"{where} is {h}x{w}, not a multiple of 16")
        _need(_get(p, "name", str, where) == f"{h}x{w}", f"{where} is named {p['name']!r}, not {h}x{w}")
        _need(_get(p, "image_tokens", int, where) == h * w // 256, f"{where}.image_tokens does not match its size")
        _need(p["name"] not in out, f"profile {p['name']} is listed twice")
        out[p["name"]] = p
    _need(len({(p["batch"], p["text_tokens"], p["world_size"], p["references"]) for p in profiles}) == 1,
          "the profiles differ in batch, text tokens, world size or references")
    return out


def _check_cache(m) -> None:
    from fluxc.runtime.core.cache_config import CacheConfig, cache_config_from_dict

    cache = _get(m, "cache", dict, "manifest")
    fields = set(_get(cache, "config", dict, "cache"))
    _need(fields == set(CacheConfig.__dataclass_fields__), f"cache.config has the fields {sorted(fields)}")
    try:
        cache_config_from_dict(cache["config"])
    except (FluxcError, TypeError, ValueError, KeyError) as e:
        raise _Damaged(f"its cache config is invalid ({e})") from None
    if "cut" in cache:
        for key in ("after_kind", "after_layer"):
            _get(cache["cut"], key, str, "cache.cut")
        probes = _get(cache, "probes", dict, "cache")
        _need("modulated" in probes and (probes["modulated"] is None or isinstance(probes["modulated"], str)),
              "cache.probes.modulated is missing or malformed")
        _need(probes["modulated"] is not None or isinstance(cache.get("why_no_probe"), str),
              "cache has neither a TeaCache probe nor why_no_probe")


def _tensor_specs(seg: dict, key: str, where: str) -> list:
    specs = _get(seg, key, list, where)
    for j, spec in enumerate(specs):
        at = f"{where}.{key}[{j}]"
        _get(spec, "name", str, at)
        shape = _get(spec, "shape", list, at)
        _need(all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape), f"{at}.shape is malformed")
        _need(_get(spec, "dtype", str, at) in TENSOR_DTYPES, f"{at}.dtype {spec['dtype']!r} is unknown")
    return specs


def _check_segments(m, family, profiles: dict, files: dict) -> None:
    segments = _get(m, "segments", list, "manifest")
    names, keys = set(), set()
    artifact = SEGMENT_FILES[m["backend"]["name"]]
    for i, seg in enumerate(segments):
        where = f"segments[{i}]"
        name, kind = _get(seg, "name", str, where), _get(seg, "kind", str, where)
        _need(name not in names, f"segment {name} is listed twice")
        names.add(name)
        profile = seg.get("profile")
        _need(profile is None or profile in profiles, f"segment {name} names an unknown profile {profile!r}")
        _need((kind, profile) not in keys, f"two segments are {kind} for profile {profile}")
        keys.add((kind, profile))
        _need(_get(seg, "dir", str, where) == f"segments/{name}", f"segment {name}'s folder is {seg['dir']!r}")
        _need(f"{seg['dir']}/{artifact}" in files, f"segment {name}'s {artifact} is not a listed file")
        _need(_get(seg, "device", str, where) in DEVICES, f"segment {name}'s device {seg['device']!r} is unknown")
        _strings(seg, "layers", where, nonempty=True)
        weights = _strings(seg, "weights", where)
        specs = _tensor_specs(seg, "weight_specs", where)
        _need(len(specs) == len(weights) and [s["name"] for s in specs] == weights,
              f"segment {name}'s weight_specs do not match its weights")
        sources = _get(seg, "weight_sources", list, where)
        _need([_source(s, f"segment {name}'s weight_sources") for s in sources] == weights,
              f"segment {name}'s weight_sources do not match its weights")
        inputs = _tensor_specs(seg, "inputs", where)
        outputs = [o["name"] for o in _tensor_specs(seg, "outputs", where)]
        wanted = _outputs(family, kind)
        _need(wanted is None or (set(outputs) <= set(wanted) if kind == "head" else sorted(outputs) == sorted(wanted)),
              f"segment {name}'s outputs {outputs} are not {wanted}")
        if kind.endswith("_schedule"):
            _need(bool(inputs) and bool(inputs[0]["shape"]) and inputs[0]["shape"][0] >= 1,
                  f"schedule segment {name} has no batched input")
    wanted = {(kind, p) for p in profiles for kind in _TRANSFORMER}
    if m.get("components") is not None:
        wanted |= {("vae", p) for p in profiles} | {(kind, None) for kind in family.encoders}
        if set(IMAGE_TASKS) & set(m["components"]["tasks"]):
            wanted |= {("vae_encoder", p) for p in profiles}
    missing = sorted(wanted - keys, key=str)
    _need(not missing, f"it has no {missing[0][0]} segment for profile {missing[0][1]}" if missing else "")


def _source(d, where: str) -> str:
    """The name of a weight source tree (fluxc.ir.WeightSource as a dict), after checking its structure."""
    name, op = _get(d, "name", str, where), _get(d, "op", str, where)
    for key in ("dim", "start", "stop"):
        _get(d, key, int, where)
    shape = _get(d, "shape", list, where)
    _need(all(isinstance(n, int) and n >= 0 for n in shape), f"{where}: {name}'s shape is not a list of sizes")
    _need(op != "load" or bool(shape), f"{where}: checkpoint tensor {name} has no shape")
    for s in _get(d, "sources", list, where):
        _source(s, where)
    return name


def _outputs(family, kind: str) -> list | None:
    """The outputs the runtime reads by name from a segment of this kind (a head's are a subset: the schedule
    segments compute the rest); None where it reads them in order (the VAE's, the schedule segments')."""
    from fluxc.runtime.core.cache_config import PROBE_OUTPUT, PROBE_SUFFIX

    if kind in family.outputs:
        return family.outputs[kind]
    if kind.endswith(PROBE_SUFFIX):
        return [PROBE_OUTPUT]
    return {"clip": ["pooled_prompt_embeds"], "t5": ["prompt_embeds"], "mistral": ["prompt_embeds"],
            "vae_encoder": ["latent_mean", "latent_std"]}.get(kind)


def _check_components(m, family, files: dict) -> None:
    _need("components" in m, "manifest has no 'components'")
    components = m["components"]
    if components is None:
        return
    _need(_get(components, "encoders", str, "components") in ENCODER_PLACEMENTS,
          f"unknown encoder placement {components['encoders']!r}")
    tasks = _strings(components, "tasks", "components", nonempty=True)
    _need(("t2i" in tasks or (len(tasks) == 1 and tasks[0] in ALONE)) and set(tasks) <= set(TASKS),
          f"components.tasks {tasks} are not t2i and image tasks, or fill, kontext or references alone")
    tokenizers = _get(components, "tokenizers", dict, "components")
    _need(sorted(tokenizers) == sorted(family.encoders), f"its tokenizers {sorted(tokenizers)} are not "
          f"{family.name}'s {sorted(family.encoders)}")
    for kind, spec in tokenizers.items():
        where = f"components.tokenizers.{kind}"
        _need(_get(spec, "file", str, where) in files, f"{where}.file {spec['file']!r} is not a listed file")
        _positive(spec, "max_length", where)
        _need(_get(spec, "pad_id", int, where) >= 0, f"{where}.pad_id is negative")
        _get(spec, "pad_token", str, where)
        if spec.get("template") is not None:
            template = _get(spec, "template", list, where)
            _need(len(template) == 2 and all(isinstance(t, str) for t in template), f"{where}.template is malformed")
        if "strip" in spec:
            _strings(spec, "strip", where)
        for side in ("truncation_side", "padding_side"):
            _need(spec.get(side, "right") in SIDES, f"{where}.{side} is neither left nor right")
