"""Engine: load a verified bundle and run the whole FLUX pipeline: prompt -> tokens -> text encoders ->
denoising loop -> VAE decoder -> image.

Imports torch, safetensors and tokenizers only (never diffusers, transformers or the compiler).
Before the loop, the engine's schedule segments (the graphs passes/hoist_schedule.py split off: time
embedding, every block's AdaLN modulation) run once over all steps' rows and give one buffer of
per-step values. On CUDA one whole step (head, every block, tail, Euler update) is captured as one CUDA
graph per profile; the loop then only copies the step's row of that buffer, its timestep and its sigma
delta on the device and replays, so there is no host sync inside the loop. With a cache policy
(runtime/cache.py) the graph also holds the skip decision and both branches, the rest of the stack and the
reuse of its remembered residual, as conditional nodes the GPU chooses between (runtime/loop.py; a
context-parallel step reads the flag on the host instead).
Segments have a static batch: more prompts than the engine's batch run in chunks, the last one padded by
repeating its last prompt.
"""

import functools
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from fluxc.runtime import cache, parallel
from fluxc.runtime.core import flux_math
from fluxc.runtime.core.cache_config import PROBE_SUFFIX, CacheConfig, cache_config_from_dict
from fluxc.runtime.core.bundle import (SAFETENSORS_DTYPES, WEIGHTS, read_manifest, read_to_gpu, verify_file,
                                      verify_files)
from fluxc.runtime.core.schema import ENCODER_PLACEMENTS, IMAGE_TASKS, REBUILD, SEGMENT_FILES
from fluxc.runtime.core.errors import FluxcError
from fluxc.runtime.core.families import ENCODER_KINDS, get_family
from fluxc.runtime.core.profile import VAE_SCALE, Profile
from fluxc.runtime.core.targets import check_runs_here
from fluxc.runtime.loaders import LOADERS
from fluxc.runtime.loop import CachedStep, StageClock, Step, StepClock, chunked

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SCHEDULE = "_schedule"  # kind suffix of a segment hoist_schedule split off its kind's segment


class Engine:
    def __init__(self, path: str, manifest: dict, device: torch.device, encoders: str | None = None):
        self.path, self.manifest, self.device = path, manifest, device
        self.config = manifest["model"]["config"]
        # FLUX.1 Fill: the transformer takes the latents, the masked image's latents and the mask side by side
        self.latent_channels = self.config["out_channels"] or self.config["in_channels"]
        self.fill = self.latent_channels != self.config["in_channels"]
        self.dtype = DTYPES["float32" if manifest["precision"] == "fp32" else "bfloat16"]
        self.profiles = {p["name"]: Profile(p["height"], p["width"], p["text_tokens"], p["batch"], p["world_size"],
                                            p["references"]) for p in manifest["profiles"]}
        self.world_size = self._first.world_size  # > 1: this process is one rank of a context-parallel run
        self.family = get_family(manifest["model"]["family"])
        self.components = manifest["components"]  # None: transformer only
        self.encoders = self._encoder_placement(encoders)
        self._segments: dict[tuple[str, str | None], tuple[dict, object]] = {}
        # schedule segments in build order (the head's first: its temb feeds the others), and where each
        # loop input they make lives in a step's row of the schedule buffer: (kind, layer, name) -> (offset, shape)
        self._schedule = [s for s in manifest["segments"] if s["kind"].endswith(SCHEDULE)]
        self._layout, self._regions = _schedule_layout(manifest["segments"])
        self._weights: dict[str, list[torch.Tensor]] = {}
        self._graphs: dict[tuple, "Step"] = {}  # captured steps by (profile, cache policy)
        self._rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # RoPE tables on the device, by profile
        self._tokenizers = {}
        self._adapter_slots = None  # AdapterSlots, made by the first set_adapters
        self._adapter_files: dict[str, "Adapter"] = {}  # adapters read so far, their factors on the device
        self.load_seconds: dict[str, float] = {}  # Engine.load's phases

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights loaded so far (every segment's, once a generation has run)."""
        return sum(t.numel() * t.element_size() for ts in self._weights.values() for t in ts)

    @classmethod
    def load(cls, path: str, verify: bool = True, encoders: str | None = None, trusted_keys=None) -> "Engine":
        """Check the engine (digests, format and manifest, GPU arch, torch version), then load weights and segments.

        trusted_keys: Ed25519 public keys (PEM paths or raw bytes). Given, the engine must carry a valid signature by
        one of them (the policy is in fluxc.runtime.core.signing); None accepts unsigned engines. No artifact is read
        before its digest (and that signature) checks out; the weights file, data only, is hashed on the other cores
        while it loads, and the load fails if it does not match. verify=False skips the digests (not with keys).
        encoders: override where a GPU engine keeps its text encoders between prompts: "gpu" (resident) or
        "offload" (in pinned CPU memory, copied to the GPU for each encode); "cpu" is fixed at build time."""
        if trusted_keys is not None and not verify:
            raise FluxcError("A signature vouches for the files only through their digests: verify=False cannot be "
                             "combined with trusted keys.", "Drop verify=False.")
        clock = _Clock()
        manifest = read_manifest(path, trusted_keys)
        device = check_runs_here(manifest)
        if verify:
            verify_files(path, manifest, skip=(WEIGHTS,))
        clock("manifest_and_artifacts_verified")
        engine = cls(path, manifest, device, encoders)
        parallel.check_world(engine.world_size)  # before any weights move
        # the weights file is hashed, and the compiled segments loaded (Python: imports, unpickling), while the
        # weights go to the device (copies, which release the GIL)
        with ThreadPoolExecutor(2) as pool:
            checked = pool.submit(verify_file, path, WEIGHTS, manifest["files"][WEIGHTS]) if verify else None
            segments = pool.submit(_timed, engine._load_segments, verify)
            try:
                engine._load_weights()
                clock("weights")
            finally:
                if checked is not None:
                    checked.result()  # a digest mismatch is the error to report, even if the load failed first
                engine._segments, clock.seconds["segments_overlapped"] = segments.result()
        clock("weights_verified_and_segments")
        engine._load_tokenizers()
        clock("tokenizers")
        engine.load_seconds = clock.seconds
        return engine

    def _load_tokenizers(self) -> None:
        if self.components:
            from fluxc.runtime.text import PromptTokenizer

            self._tokenizers = {name: PromptTokenizer(self.path, spec, name.upper())
                                for name, spec in self.components["tokenizers"].items()}

    def _load_segments(self, verify: bool) -> dict:
        loader, artifact = LOADERS[self.manifest["backend"]["name"]], SEGMENT_FILES[self.manifest["backend"]["name"]]
        out = {}
        for seg in self.manifest["segments"]:
            digest = self.manifest["files"][f"{seg['dir']}/{artifact}"] if verify else None
            out[(seg["kind"], seg["profile"])] = (seg, loader(os.path.join(self.path, seg["dir"]), digest))
        return out

    def _encoder_placement(self, asked: str | None) -> str | None:
        if self.components is None:
            return None
        built = self.components["encoders"]
        asked = asked or built
        if asked not in ENCODER_PLACEMENTS:
            raise FluxcError(f"Unknown encoder placement '{asked}'.", "Use one of: " + ", ".join(ENCODER_PLACEMENTS) + ".")
        if (asked == "cpu") != (built == "cpu"):
            raise FluxcError(f"This engine's text encoders were compiled for {'the CPU' if built == 'cpu' else 'the GPU'}; "
                             f"they cannot run with --encoders {asked}.",
                             f"Rebuild with `fluxc build --encoders {asked}`, or use --encoders "
                             + ("cpu." if built == "cpu" else "gpu or offload."))
        return asked

    def _load_weights(self) -> None:
        """Every segment's weights, each checked against the shape and dtype the segment was compiled for before
        it is read. Those that live on the GPU are allocated there and filled by one pipelined read of the file
        (bundle.read_to_gpu); the others (CPU segments, offloaded encoders) are read tensor by tensor."""
        from safetensors import SafetensorError, safe_open

        path, to_gpu = os.path.join(self.path, WEIGHTS), []
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                stored = set(f.keys())
                for seg in self.manifest["segments"]:
                    place = self._placer(seg)
                    for layer in seg["layers"]:
                        prefix = f"{layer}." if layer else ""
                        key = f"{seg['kind']}:{layer}"
                        if key in self._weights:
                            continue
                        self._weights[key] = []
                        for spec in seg["weight_specs"]:
                            name = prefix + spec["name"]
                            _check_entry(f, stored, name, spec)
                            if place is None:
                                to_gpu.append((name, torch.empty(spec["shape"], dtype=_DTYPES[spec["dtype"]],
                                                                 device=self.device)))
                                self._weights[key].append(to_gpu[-1][1])
                            else:
                                self._weights[key].append(place(f.get_tensor(name)))
            read_to_gpu(path, to_gpu)
        except (SafetensorError, OSError) as e:
            raise FluxcError(f"Cannot read {WEIGHTS} of '{self.path}': {e}.", REBUILD) from None

    def _placer(self, seg: dict):
        """How a segment's weights are placed once read: None for the GPU (read straight there)."""
        if seg["device"] == "cpu":
            return torch.Tensor.clone  # Inductor CPU kernels want aligned inputs; mmap'd slices may not be
        if seg["kind"] in ENCODER_KINDS and self.encoders == "offload":
            return torch.Tensor.pin_memory
        return None

    # ---- LoRA adapters ---------------------------------------------------------------------------
    def set_adapters(self, adapters) -> dict:
        """Apply LoRA adapters, replacing the ones set before: a list of (adapter, scale), an adapter being a `.fluxa`
        path (written by `fluxc adapter`) or a read Adapter; [] restores the base weights bit for bit. Every
        weight an adapter changes is made again from its base (runtime/adapters.py) into the same buffer, so the
        captured CUDA graphs stay valid. Returns {"tensors": how many were written, "seconds": the time it took}."""
        from fluxc.runtime.adapters import AdapterSlots, check_adapter

        start = time.perf_counter()
        pairs = [self._adapter(item) for item in adapters]
        for adapter, _ in pairs:  # those read here were checked already; an Adapter made elsewhere may not be
            check_adapter(adapter, self.family.name, self.linears)
        if self._adapter_slots is None:
            self._adapter_slots = AdapterSlots(self.manifest, self._weights)
        with torch.no_grad():
            written = self._adapter_slots.apply(pairs, self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {"tensors": written, "seconds": time.perf_counter() - start}

    @property
    def adapters(self) -> list[tuple[str, float]]:
        """The adapters set now: (name, scale)."""
        return [(a.name, s) for a, s in self._adapter_slots.active] if self._adapter_slots else []

    @functools.cached_property
    def linears(self) -> dict[str, list[int]]:
        """The checkpoint linears adapters may change: diffusers module name -> weight shape [N, K]."""
        from fluxc.runtime.adapters import engine_linears

        return engine_linears(self.manifest)

    def load_adapter(self, path: str) -> "Adapter":
        """The adapter file at `path`, verified and checked to fit this engine, its factors on the engine's device
        (read once per path; set_adapters takes it or the path)."""
        from fluxc.runtime.adapters import check_adapter, read_adapter

        path = os.path.abspath(os.fspath(path))
        if path not in self._adapter_files:
            adapter = read_adapter(path)
            check_adapter(adapter, self.family.name, self.linears)
            adapter.factors = {m: (d.to(self.device), u.to(self.device)) for m, (d, u) in adapter.factors.items()}
            self._adapter_files[path] = adapter
        return self._adapter_files[path]

    def _adapter(self, item) -> tuple["Adapter", float]:
        from fluxc.runtime.adapters import Adapter

        adapter, scale = item if isinstance(item, (tuple, list)) else (item, 1.0)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise FluxcError(f"An adapter's scale must be a finite number, got {scale!r}.", "Use e.g. 0.8.")
        return (adapter if isinstance(adapter, Adapter) else self.load_adapter(adapter)), float(scale)

    # ---- one transformer forward -------------------------------------------------------------
    def profile_for(self, height: int | None = None, width: int | None = None) -> Profile:
        """The profile of that size; a side left None takes the first profile's."""
        height, width = height or self._first.height, width or self._first.width
        name = f"{height}x{width}"
        if name not in self.profiles:
            fix = (f"rebuild with --resolution {name}" if height % 16 == 0 and width % 16 == 0 else
                   f"FLUX sizes are multiples of 16 (e.g. {max(16, round(height / 16) * 16)}x{max(16, round(width / 16) * 16)})")
            raise FluxcError(f"This engine has no {name} profile; it was built for {', '.join(self.profiles)}.",
                             f"Use one of those sizes, or {fix}.")
        return self.profiles[name]

    def rope(self, profile: Profile) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T + S, D] (this rank's rows in a context-parallel run: its text rows, then its image rows),
        made once per profile: a host computation that would otherwise precede every loop."""
        if profile.name not in self._rope:
            self._rope[profile.name] = self._rope_tables(profile)
        return self._rope[profile.name]

    def _rope_tables(self, profile: Profile) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.family.position_ids(profile)
        tables = flux_math.rope_tables(ids, tuple(self.config["axes_dims_rope"]), self.family.rope_theta(self.config))
        return tuple(self._local(t, 0, profile.text_tokens).to(self.device) for t in tables)

    def _local(self, x: torch.Tensor, dim: int, text_tokens: int | None = None) -> torch.Tensor:
        """This rank's share of a full-sequence tensor along dim: of [text; image] rows when text_tokens is given."""
        if self.world_size == 1:
            return x
        if text_tokens is None:
            return parallel.shard(x, dim, self.world_size, parallel.rank())
        return parallel.shard_joint(x, dim, text_tokens, self.world_size, parallel.rank())

    def run_segment(self, kind: str, profile: Profile | None, layer: str, acts: dict) -> dict[str, torch.Tensor]:
        """One segment for one layer: inputs by name from `acts` (or from the step's schedule row), outputs by name."""
        seg, fn = self._segments[(kind, profile and profile.name)]
        args = []
        for i in seg["inputs"]:
            where = self._layout.get((kind.removesuffix(PROBE_SUFFIX), layer, i["name"]))  # a probe reads its block's row
            if where is None:
                if i["name"] not in acts:
                    raise FluxcError(f"Segment {seg['name']} takes an input {i['name']!r} that nothing in the engine "
                                     "makes.", REBUILD)
                args.append(acts[i["name"]])
            else:
                offset, shape = where
                args.append(acts["schedule"].narrow(0, offset, math.prod(shape)).view(shape))
        return dict(zip((o["name"] for o in seg["outputs"]), _call(seg, fn, self._weights[f"{kind}:{layer}"], args)))

    def _rows(self, kind: str, profile: Profile | None, layer: str, names: list[str]):
        """fn(*tensors) -> the segment's outputs as a list, the tensors being its inputs `names`: for chunked."""
        return lambda *xs: list(self.run_segment(kind, profile, layer, dict(zip(names, xs))).values())

    def schedule(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor | None) -> torch.Tensor:
        """Every step's schedule row at once: timestep [steps, B], guidance [B] (guidance-distilled models),
        pooled [B, 768] (FLUX.1) -> [steps, row] (an empty row for an engine built without hoist_schedule)."""
        steps = timestep.shape[0]
        values = {"timestep": timestep.reshape(-1)}
        if pooled is not None:
            values["pooled_projections"] = pooled.repeat(steps, 1)
        if guidance is not None:
            values["guidance"] = guidance.repeat(steps)
        rows = {}
        for seg in self._schedule:
            names = [i["name"] for i in seg["inputs"]]
            chunk = seg["inputs"][0]["shape"][0]  # compiled for this many rows: steps x batch run in chunks
            loop_kind = seg["kind"].removesuffix(SCHEDULE)
            for layer in seg["layers"]:
                outs = chunked(self._rows(seg["kind"], None, layer, names), chunk, *(values[n] for n in names))
                for o, out in zip(seg["outputs"], outs):
                    rows[(loop_kind, layer, o["name"])] = out
                    values[o["name"]] = out  # the head's temb: an input of the other schedule segments
        if not self._regions:
            return timestep.new_empty(steps, 0)
        return torch.cat([rows[key].reshape(steps, -1) for key in self._regions], dim=1)

    def transformer(self, profile: Profile, acts: dict) -> torch.Tensor:
        """acts: hidden_states [B, S, 64], encoder_hidden_states [B, T, 4096], pooled_projections [B, 768] (FLUX.1),
        timestep [B], guidance [B] (if the model is guidance-distilled), rope_cos/rope_sin [T+S, 128];
        optionally `schedule`, this step's row of Engine.schedule (else computed here)."""
        acts = dict(acts)
        if "schedule" not in acts:
            acts["schedule"] = self.schedule(acts["timestep"][None], acts.get("guidance"), acts.get("pooled_projections"))[0]
        acts = self.head(profile, acts)
        self.blocks(profile, acts)
        return self.tail(profile, acts)

    def head(self, profile: Profile, acts: dict) -> dict:
        """acts with the head's outputs: the streams entering the first block, temb (and FLUX.2's modulations).
        A Fill engine's image stream enters as the latents with the masked image and mask beside them."""
        if "fill_cond" in acts:
            acts = dict(acts, hidden_states=torch.cat([acts["hidden_states"], acts["fill_cond"]], dim=2))
        if "references" in acts:  # Kontext, FLUX.2: the reference images' tokens after the latents'
            acts = dict(acts, hidden_states=torch.cat([acts["hidden_states"], acts["references"]], dim=1))
        return dict(acts) | self.run_segment("head", profile, "", acts)

    def tail(self, profile: Profile, acts: dict) -> torch.Tensor:
        """noise_pred [B, S, C] from the last block's image stream (the references' rows dropped)."""
        noise_pred = self.run_segment("tail", profile, "", acts)["noise_pred"]
        return noise_pred[:, :profile.image_tokens] if profile.references else noise_pred

    def double_layers(self, profile: Profile) -> list[str]:
        return self._segments[("double", profile.name)][0]["layers"]

    def blocks(self, profile: Profile, acts: dict, first: int = 0) -> None:
        """The block stack from double layer `first` on: acts' streams in, acts["hidden_states"] [B, S, C] out."""
        for layer in self.double_layers(profile)[first:]:
            acts |= self.run_segment("double", profile, layer, acts)
        acts["joint_hidden_states"] = torch.cat([acts["encoder_hidden_states"], acts["hidden_states"]], dim=1)
        for layer in self._segments[("single", profile.name)][0]["layers"]:
            acts |= self.run_segment("single", profile, layer, acts)
        acts["hidden_states"] = acts["joint_hidden_states"][:, profile.local_text_tokens:]

    # ---- text to image ---------------------------------------------------------------------------
    def generate(self, prompt: str | list[str], *, height: int | None = None, width: int | None = None,
                 steps: int = 28, guidance: float = 3.5, seed: int | list[int] = 0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 max_sequence_length: int | None = None, output_type: str = "pil", timings: dict | None = None,
                 cache_config: CacheConfig | None = None, report: dict | None = None,
                 step_ms: list | None = None, on_step=None, image=None, strength: float = 0.6, mask=None):
        """Images for one prompt or a list, as FluxPipeline(prompt, ...) makes them; with `image`, as
        FluxImg2ImgPipeline(prompt, image=..., strength=...) does, and with a `mask` too as FluxInpaintPipeline
        (an engine built with --tasks t2i,img2img or t2i,inpaint).

        height/width default to the engine's first profile; the initial noise for all prompts is drawn at
        once from `generator` (default: a CPU generator seeded with `seed`), so an engine of any batch size
        gives the same images as FluxPipeline with the whole list. A list of seeds or generators, one per prompt,
        draws each prompt's noise alone, as FluxPipeline does with a list of generators: each image is then the
        one that prompt and seed give by themselves (what a server batching requests needs). output_type: "pil" (list of PIL images),
        "np" (float32 [N, H, W, 3] in [0, 1]) or "pt" (the same as a tensor). `timings`, if given, receives
        the seconds of each stage (encode, denoise, decode). cache_config, `report` and `step_ms`: as in
        Engine.denoise (with more prompts than the engine's batch, the report describes the last chunk and
        step_ms holds every chunk's steps); on_step too, called for every chunk's steps.
        image: an RGB PIL image of the profile's size for every prompt, or a list of one per prompt; strength in
        (0, 1]: the share of the schedule that runs (FluxImg2ImgPipeline's: the first int(steps * (1 - strength))
        steps are skipped and the encoded image is noised to the first step that runs). mask: a PIL image of the
        same size (grey levels; white is repainted, black kept: binarized at 0.5 as the pipeline's mask processor
        does); after every step the kept part is reset to the image noised to the next step (clean after the last)."""
        prompts, profile = self.check_generation(prompt, height=height, width=width, steps=steps, guidance=guidance,
                                                 max_sequence_length=max_sequence_length, output_type=output_type,
                                                 cache_config=cache_config)
        start, pixels, masks = 0, None, None
        if profile.references:
            if mask is not None:
                raise FluxcError("A reference-editing engine takes no mask: the prompt says what to change.",
                                 "Drop the mask, or build --tasks t2i,inpaint for masked repainting.")
            pixels = self._reference_pixels(image, profile, steps)
        elif self.fill and (image is None or mask is None):
            raise FluxcError("This is a FLUX.1 Fill engine: it repaints the masked part of an image.",
                             "Pass image= and mask= (white: repaint).")
        elif image is not None:
            pixels, start, masks = self.check_image(image, len(prompts), profile, steps, strength, mask)
        elif mask is not None:
            raise FluxcError("A mask was given without an image.", "Pass the image the mask belongs to (image=...).")
        stage = StageClock(self.device, timings)
        with stage("encode"):
            prompt_embeds, pooled = self.encode_prompt(prompts)
        with stage("denoise"):
            n, seeds = len(prompts), seed if generator is None else generator
            conditions = {}  # the loop state an image task adds (Engine.denoise), per prompt
            if pixels is None or profile.references:
                noise = self._initial_noise(n, profile, seeds)
                if profile.references:  # the references' latents: the encoder's mean, their tokens one after another
                    mean, _ = self._encode_image(pixels, profile)
                    refs = torch.cat(list(self.family.pack_grid(mean).unbind(0)))[None]  # [1, R * S, C]
                    conditions["references"] = refs.expand(n, *refs.shape[1:])
            else:
                noise, image_latents, fresh, fill = self._image_noise(pixels, n, profile, steps, start, seeds,
                                                                      mask if self.fill else None)
                if self.fill:
                    conditions["fill_cond"] = fill
                elif masks is not None:
                    conditions |= {"inpaint_mask": masks.expand(n, *masks.shape[1:]), "inpaint_image": image_latents,
                                   "inpaint_noise": fresh}
            names = list(conditions)

            def chunk(z, embeds, *rest):  # rest: the pooled embedding (FLUX.1), then the conditions
                pooled_chunk = rest[0] if pooled is not None else None
                return [self.denoise(embeds, pooled_chunk, height=profile.height, width=profile.width, steps=steps,
                                     guidance=guidance, latents=z, cache_config=cache_config, report=report,
                                     step_ms=step_ms, on_step=on_step, start=start,
                                     conditions=dict(zip(names, rest[pooled is not None:])))]

            latents = chunked(chunk, profile.batch, noise, prompt_embeds, *[p for p in [pooled] if p is not None],
                              *conditions.values())[0]
        with stage("decode"):
            images = self.decode(latents, profile)
        return _as_output(images, output_type)

    def check_generation(self, prompt, *, height: int | None = None, width: int | None = None, steps: int = 28,
                         guidance: float = 3.5, max_sequence_length: int | None = None, output_type: str = "pil",
                         cache_config: CacheConfig | None = None) -> tuple[list[str], Profile]:
        """The checks generate makes before any work (prompts, size, sampling settings, cache policy), without
        touching the device: a FluxcError for the first that fails, else (the prompts as a list, the profile).
        A server runs them per request, before queueing it."""
        prompts = self._check_prompts(prompt)
        profile = self.profile_for(height, width)
        self._check_sampling(steps, guidance, max_sequence_length, output_type)
        self._check_cache(cache_config or self.cache_config())
        return prompts, profile

    def check_image(self, image, n: int, profile: Profile, steps: int, strength, mask=None
                    ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """(pixels [1 or n, 3, H, W] in [-1, 1] as FluxImg2ImgPipeline's image processor makes them: one row for an
        image all n prompts share; the first step that runs; the mask packed as the latents [1, S, C], or None),
        after checking the engine, the image(s), the mask and the strength; FluxcError for the first that fails."""
        import numpy as np
        from PIL import Image

        tasks = self.components["tasks"] if self.components else []
        if not set(IMAGE_TASKS) & set(tasks):
            raise FluxcError("This engine was built without an image task (img2img, inpaint: no VAE encoder).",
                             "Rebuild it with `fluxc build --tasks t2i,img2img,inpaint`.")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise FluxcError(f"strength must be in (0, 1], got {strength!r}.", "Use e.g. strength=0.6 (1: ignore the "
                             "image's content, keep its size; small: stay close to it).")
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if len(images) not in (1, n) or (len(images) == 1 and isinstance(image, (list, tuple)) and n > 1):
            raise FluxcError(f"{len(images)} images were given for {n} prompts.", "Pass one image, or one per prompt.")
        for im in images:
            if not isinstance(im, Image.Image):
                raise FluxcError(f"image must be a PIL image, got {type(im).__name__}.", "Open it with PIL.Image.open.")
            if im.mode != "RGB":
                raise FluxcError(f"The image is {im.mode}; the VAE takes RGB.", "Convert it: image.convert(\"RGB\").")
            if im.size != (profile.width, profile.height):
                raise FluxcError(f"The image is {im.size[0]}x{im.size[1]} (width x height); this engine's profile is "
                                 f"{profile.width}x{profile.height}.", "Resize it to the profile, or ask for the size "
                                 "of the image (height=..., width=...) if the engine has that profile.")
        # FluxImg2ImgPipeline.get_timesteps
        start = int(max(steps - min(steps * strength, steps), 0))  # < steps for any strength > 0
        pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images]))
        return pixels.permute(0, 3, 1, 2) * 2.0 - 1.0, start, None if mask is None else self._mask(mask, profile)

    def _mask(self, mask, profile: Profile) -> torch.Tensor:
        """FluxInpaintPipeline's mask: grey, binarized at 0.5, resized to the latents (nearest), one copy per latent
        channel, packed: [1, S, C]."""
        import numpy as np
        from PIL import Image

        if not isinstance(mask, Image.Image):
            raise FluxcError(f"mask must be a PIL image, got {type(mask).__name__}.", "Open it with PIL.Image.open.")
        if mask.size != (profile.width, profile.height):
            raise FluxcError(f"The mask is {mask.size[0]}x{mask.size[1]}; the image is {profile.width}x{profile.height}.",
                             "Pass a mask of the image's size (white: repaint, black: keep).")
        h, w = profile.height // VAE_SCALE, profile.width // VAE_SCALE
        small = torch.nn.functional.interpolate(self._binary_mask(mask), size=(h, w))
        return flux_math.pack_latents(small.repeat(1, self.latent_channels // 4, 1, 1))

    def _reference_pixels(self, image, profile: Profile, steps: int) -> torch.Tensor:
        """The reference images of a reference-editing engine (FluxKontextPipeline: one; Flux2Pipeline(image=[...]):
        the engine's count), checked, as pixels [R, 3, H, W] in [-1, 1]."""
        images = image if isinstance(image, (list, tuple)) else [image] if image is not None else []
        if len(images) != profile.references:
            raise FluxcError(f"This engine edits with {profile.references} reference image(s); {len(images)} were "
                             "given.", f"Pass image= with {profile.references} image(s) of the profile's size, or "
                             "build --references N for another count.")
        return torch.cat([self.check_image(im, 1, profile, steps, 1.0)[0] for im in images])

    def _encode_image(self, pixels: torch.Tensor, profile: Profile) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE encoder segment on pixels [N, 3, H, W] in [-1, 1]: the latent distribution's mean and std in the
        transformer's latent scale, on the CPU (where the generators draw)."""
        mean, std = chunked(self._rows("vae_encoder", profile, "vae", ["image"]), profile.batch,
                            pixels.to(self.device, self.dtype))
        return mean.cpu(), std.cpu()

    @staticmethod
    def _binary_mask(mask) -> torch.Tensor:
        """The pipelines' mask processor: grey, binarized at 0.5, [1, 1, H, W] float32."""
        import numpy as np

        grey = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]
        return (grey >= 0.5).to(torch.float32)

    def _image_noise(self, pixels: torch.Tensor, n: int, profile: Profile, steps: int, start: int, seed,
                     fill_mask=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """FluxImg2ImgPipeline.prepare_latents for n prompts: the image's latents sampled from the VAE encoder's
        distribution, then noised to sigma[start]; returns (those, the image's latents, the noise), packed [n, S, C],
        and with fill_mask (a Fill engine) FluxFillPipeline's conditioning, else None: the masked image's latents,
        sampled likewise from the same generators after the noise, and the full-resolution mask, packed [n, S, 320].
        One generator: the sample is drawn for the image rows (one row shared by every prompt, as the pipeline
        encodes one image once), then the noise for all n; a list of them (one per prompt): each prompt draws its
        sample and noise alone."""
        mean, std = self._encode_image(pixels, profile)
        mean, std = mean.expand(n, *mean.shape[1:]), std.expand(n, *std.shape[1:])
        shared = pixels.shape[0] == 1
        if isinstance(seed, (list, tuple)):
            if len(seed) != n:
                raise FluxcError(f"{len(seed)} seeds or generators were given for {n} prompts.",
                                 "Pass one seed (or generator) for all prompts, or a list of one per prompt.")
            draws = [(flux_math.generator(s), slice(i, i + 1), slice(i, i + 1)) for i, s in enumerate(seed)]
        else:
            draws = [(flux_math.generator(seed), slice(0, 1) if shared else slice(None), slice(None))]
        if fill_mask is not None:
            binary = self._binary_mask(fill_mask)  # [1, 1, H, W]
            masked_mean, masked_std = self._encode_image(pixels * (1 - binary), profile)
            masked_mean = masked_mean.expand(n, *masked_mean.shape[1:])
            masked_std = masked_std.expand(n, *masked_std.shape[1:])
        images, noises, masked = [], [], []
        for gen, sample_rows, rows in draws:
            eps = torch.randn(mean[sample_rows].shape, generator=gen, dtype=mean.dtype, device=gen.device)
            noises.append(torch.randn(mean[rows].shape, generator=gen, dtype=self.dtype, device=gen.device))
            images.append((mean[sample_rows] + std[sample_rows] * eps).expand_as(noises[-1]))
            if fill_mask is not None:
                eps = torch.randn(masked_mean[sample_rows].shape, generator=gen, dtype=mean.dtype, device=gen.device)
                masked.append((masked_mean[sample_rows] + masked_std[sample_rows] * eps).expand_as(noises[-1]))
        image, noise = (flux_math.pack_latents(torch.cat(x).to(self.dtype)) for x in (images, noises))
        sigma = self.family.sigmas(steps, profile.image_tokens)[start].to(self.dtype)
        out = (sigma * noise + (1.0 - sigma) * image, image, noise)
        if fill_mask is None:
            return (*out, None)
        h, w = profile.height // VAE_SCALE, profile.width // VAE_SCALE  # FluxFillPipeline.prepare_mask_latents
        pixels_per_latent = binary[:, 0].view(1, h, VAE_SCALE, w, VAE_SCALE).permute(0, 2, 4, 1, 3)
        mask_channels = flux_math.pack_latents(pixels_per_latent.reshape(1, VAE_SCALE ** 2, h, w)).to(self.dtype)
        cond = torch.cat([flux_math.pack_latents(torch.cat(masked).to(self.dtype)),
                          mask_channels.expand(n, *mask_channels.shape[1:])], dim=2)
        return (*out, cond)

    def _initial_noise(self, n: int, profile: Profile, seed) -> torch.Tensor:
        """Packed noise for n prompts from one seed or generator, or row by row from a list of them."""
        if not isinstance(seed, (list, tuple)):
            return self.family.initial_noise(n, profile, self.latent_channels, seed, self.dtype)
        if len(seed) != n:
            raise FluxcError(f"{len(seed)} seeds or generators were given for {n} prompts.",
                             "Pass one seed (or generator) for all prompts, or a list of one per prompt.")
        return torch.cat([self.family.initial_noise(1, profile, self.latent_channels, s, self.dtype) for s in seed])

    @property
    def _first(self) -> Profile:
        return next(iter(self.profiles.values()))

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """prompt_embeds [N, T, D] and pooled_prompt_embeds [N, 768] (None for FLUX.2) on the engine's device, as
        the family's pipeline encode_prompt gives them: FLUX.1 T5 and CLIP, FLUX.2 the Mistral encoder."""
        if self.components is None:
            raise _transformer_only_error()
        outputs = {}
        with self._encoders_loaded():
            for kind in self.family.encoders:
                seg = self._segments[(kind, None)][0]
                tokens = self._tokenizers[kind](prompts)  # input_ids [N, L] (and attention_mask)
                names = [i["name"] for i in seg["inputs"]]
                outs = chunked(self._rows(kind, None, seg["layers"][0], names), self._first.batch,
                                *(tokens[n].to(self._encoder_device) for n in names))
                outputs |= dict(zip((o["name"] for o in seg["outputs"]), outs))
        pooled = outputs.get("pooled_prompt_embeds")
        return outputs["prompt_embeds"].to(self.device), pooled if pooled is None else pooled.to(self.device)

    @property
    def _encoder_device(self) -> torch.device:
        return torch.device("cpu") if self.encoders == "cpu" else self.device

    @contextmanager
    def _encoders_loaded(self):
        """With offloaded encoders, copy their weights to the GPU for the block and drop the copies after."""
        if self.encoders != "offload":
            yield
            return
        parked = {k: v for k, v in self._weights.items() if k.split(":")[0] in ENCODER_KINDS}
        self._weights.update({k: [t.to(self.device, non_blocking=True) for t in v] for k, v in parked.items()})
        try:
            yield
        finally:
            self._weights.update(parked)

    def decode(self, latents: torch.Tensor, profile: Profile) -> torch.Tensor:
        """Packed latents [N, S, C] -> float32 images [N, H, W, 3] in [0, 1] on the CPU (the VAE segment)."""
        if self.components is None:
            raise _transformer_only_error()
        unpacked = self.family.unpack_latents(latents, profile)  # FLUX.1 [N, 16, H/8, W/8]; FLUX.2 [N, 128, H/16, W/16]
        images, = chunked(self._rows("vae", profile, "vae", ["latents"]), profile.batch, unpacked)
        return images.float().cpu()

    def _check_prompts(self, prompt) -> list[str]:
        if self.components is None:
            raise _transformer_only_error()
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise FluxcError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}.",
                             "Pass e.g. prompt=\"a photo of a cat\" or a list of such strings.")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise FluxcError(f"Every prompt must be a string; got {type(bad[0]).__name__} {bad[0]!r}.",
                             "Convert prompts to str before calling generate.")
        return list(prompts)

    def _check_sampling(self, steps, guidance, max_sequence_length, output_type) -> None:
        _check_steps(steps)
        if not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
            raise FluxcError(f"guidance must be a finite number, got {guidance!r}.", "Use e.g. --guidance 3.5.")
        text = self._first.text_tokens
        if max_sequence_length not in (None, text):
            raise FluxcError(f"This engine encodes prompts to {text} text tokens, not {max_sequence_length}: its "
                             "segments have static shapes.", f"Drop max_sequence_length, or rebuild with --text-tokens {max_sequence_length}.")
        if output_type not in ("pil", "np", "pt"):
            raise FluxcError(f"Unknown output_type {output_type!r}.", "Use pil, np or pt.")

    # ---- the denoising loop --------------------------------------------------------------------
    def denoise(self, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor | None, *, height: int, width: int,
                steps: int = 28, guidance: float = 3.5, seed: int = 0, latents: torch.Tensor | None = None,
                cuda_graph: bool = True, cache_config: CacheConfig | None = None,
                report: dict | None = None, step_ms: list | None = None, on_step=None, start: int = 0,
                conditions: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Packed latents [B, S, 64] after `steps` flow-matching Euler steps, as FluxPipeline(output_type="latent")
        (FLUX.2: [B, S, 128] as Flux2Pipeline, from prompt_embeds alone: pooled_prompt_embeds None).

        latents: the packed initial noise [B, S, 64] (default: drawn from `seed`).
        cuda_graph=False runs the same step eagerly on CUDA (for debugging and for tests of the graph).
        cache_config: the step-skipping policy (default: the engine's, see Engine.cache_config); `report`, if
        given, receives report["cache"]: the policy and which steps it skipped. `step_ms`, if given, receives
        each step's milliseconds (CUDA events on a GPU, no sync inside the loop; wall clock on the CPU).
        on_step(i), if given, is called after step i is launched (for progress bars: on a GPU the step may still
        run; the caller synchronizes if it wants the bar to follow the GPU). start: the first of the schedule's
        `steps` steps that runs (image to image: latents are then the image noised to that step). conditions: the
        loop state an image task adds, packed [B, S', C'] (generate makes them):
            inpaint_mask, inpaint_image, inpaint_noise  after each step, where the mask is 0 the latents are reset to
                        the image noised to the next step's sigma (the clean image after the last: FluxInpaintPipeline)
            fill_cond   a Fill engine's masked image latents and mask, beside the latents at every step
            references  the reference images' tokens, after the latents' in the image stream at every step"""
        profile = self.profile_for(height, width)
        self._check_embeddings(profile, prompt_embeds, pooled_prompt_embeds)
        _check_steps(steps)
        config = cache_config or self.cache_config()
        self._check_cache(config)
        if latents is None:
            latents = self.family.initial_noise(profile.batch, profile, self.latent_channels, seed, self.dtype)
        sig = self.family.sigmas(steps, profile.image_tokens)[start:]  # [steps - start + 1] f32
        steps -= start
        timesteps = (sig[:-1] * 1000).to(self.dtype) / 1000  # as FluxPipeline rounds t before /1000
        state = {  # this rank's tokens in a context-parallel run
            # copies: the step updates its state in place, and the caller's tensors stay theirs
            "hidden_states": self._local(latents, 1).to(self.device, self.dtype, copy=True).contiguous(),
            "encoder_hidden_states": self._local(prompt_embeds, 1).to(self.device, self.dtype, copy=True),
        }
        if self.family.pooled:
            state["pooled_projections"] = pooled_prompt_embeds.to(self.device, self.dtype, copy=True)
        if self.config["guidance_embeds"]:
            state["guidance"] = torch.full((profile.batch,), float(guidance), device=self.device)
        per_step = {
            "timestep": timesteps[:, None].expand(steps, profile.batch).to(self.device),
            "dt": (sig[1:] - sig[:-1]).to(self.device),  # [steps] f32
        }
        per_step["schedule"] = self.schedule(per_step["timestep"], state.get("guidance"), state.get("pooled_projections"))
        conditions = conditions or {}
        for needed, engine in (("references", "a reference-editing" if profile.references else None),
                               ("fill_cond", "a FLUX.1 Fill" if self.fill else None)):
            if engine and needed not in conditions:
                raise FluxcError(f"This is {engine} engine: its denoising loop needs the image's latents.",
                                 "Call generate(prompt, image=...) (Fill: image= and mask=).")
        state |= {k: v.to(self.device, self.dtype, copy=True) for k, v in conditions.items()}
        if "inpaint_mask" in conditions:
            per_step["inpaint_sigma"] = sig[1:].to(self.device, self.dtype)[:, None]  # [steps, 1]: each step's next
        if config.on:
            per_step["cache_mode"] = cache.step_modes(config, steps).to(self.device)
            state |= cache.initial_state(self._stream_like(profile))
        state |= {k: v[0].clone() for k, v in per_step.items()}
        state["rope_cos"], state["rope_sin"] = self.rope(profile)

        step = self._step(profile, config, state, graphed=self.device.type == "cuda" and cuda_graph,
                          inpaint="inpaint_mask" in conditions)
        reported = report is not None and config.on
        flags, clock = [], StepClock(self.device) if step_ms is not None else None
        for i in range(steps):
            if clock:
                clock.tick()
            for k, v in per_step.items():
                step.state[k].copy_(v[i])  # device to device: no host sync
            step.run()
            if reported:
                flags.append(step.state["cache_skip"].clone())  # on the device; the next step overwrites the flag
            if on_step is not None:
                on_step(i)
        if clock:
            step_ms.extend(clock.done())
        if reported:
            skipped = [i for i, skip in enumerate(torch.stack(flags).tolist()) if skip]  # read once, after the loop
            report["cache"] = config.to_dict() | {"threshold": config.limit, "skipped_steps": skipped,
                                                  "full_steps": steps - len(skipped)}
        return parallel.gather(step.state["hidden_states"].clone(), 1)

    def cache_config(self, **overrides) -> CacheConfig:
        """The engine's step-skipping policy (built with `fluxc build --cache`), with fields overridden:
        policy, threshold, warmup_steps, max_consecutive_skips, schedule (None keeps a field)."""
        config = cache_config_from_dict(self.manifest["cache"]["config"]).with_overrides(**overrides)
        tuned = sorted(k for k, v in overrides.items() if k != "policy" and v is not None)
        if tuned and not config.on:
            raise FluxcError(f"Cache settings {tuned} were given, but no cache policy is on (this engine's default "
                             "is none).", "Add --cache fbcache or --cache teacache.")
        return config

    def _check_cache(self, config: CacheConfig) -> None:
        points = self.manifest["cache"]
        if config.on and "cut" not in points:
            raise FluxcError("This engine has no cache points (built before fluxc had them).",
                             "Rebuild it with this fluxc, or run with --cache none.")
        if config.policy == "teacache" and not points.get("probes", {}).get("modulated"):
            raise FluxcError("This engine has no TeaCache probe: " + points.get("why_no_probe", "it was not built"),
                             "Use --cache fbcache, or rebuild with a fused recipe.")

    def _stream_like(self, profile: Profile) -> torch.Tensor:
        """An empty image-stream activation [B, S, C], the shape the cache probes have."""
        channels = self.config["num_attention_heads"] * self.config["attention_head_dim"]
        return torch.empty(profile.batch, profile.local_image_tokens, channels, device=self.device, dtype=self.dtype)

    def _step(self, profile: Profile, config: CacheConfig, state: dict, graphed: bool, inpaint: bool = False) -> "Step":
        """The step runner for this profile and policy; captured ones are kept for the next generation."""
        kind = CachedStep if config.on else Step
        if not graphed:
            return kind(self, profile, config, state, graphed=False)
        key = self.graph_key(profile, config) + (("inpaint",) if inpaint else ())
        if key not in self._graphs:
            self._graphs[key] = kind(self, profile, config, state, graphed=True)
        step = self._graphs[key]
        step.load(state)
        return step

    @staticmethod
    def graph_key(profile: Profile, config: CacheConfig) -> tuple:
        """Which captured step serves this profile and policy (the schedule and warm-up are per-step inputs;
        the rest of a policy is baked into its graphs)."""
        if not config.on:
            return (profile.name,)
        return (profile.name, config.policy, config.limit, config.max_consecutive_skips)

    def _check_embeddings(self, profile: Profile, prompt_embeds, pooled) -> None:
        checks = [("prompt_embeds", prompt_embeds, (profile.batch, profile.text_tokens, self.config["joint_attention_dim"]))]
        if self.family.pooled:
            checks.append(("pooled_prompt_embeds", pooled, (profile.batch, self.config["pooled_projection_dim"])))
        elif pooled is not None:
            raise FluxcError(f"This {self.family.name} engine takes no pooled prompt embedding.",
                             "Pass pooled_prompt_embeds=None (the model conditions on prompt_embeds alone).")
        for name, t, want in checks:
            if t is None or tuple(t.shape) != want:
                raise FluxcError(f"{name} has shape {None if t is None else tuple(t.shape)}; this engine takes {want}.",
                                 "Encode prompts with the text encoders this engine's model was trained with, "
                                 "padded to the engine's text length.")


def _schedule_layout(segments: list[dict]) -> tuple[dict[tuple[str, str, str], tuple[int, list[int]]], list]:
    """Where each loop-segment input a schedule segment makes lives in a step's schedule row:
    ({(kind, layer, input name): (offset, shape)}, the row's regions in order, each the (kind, layer, name) of
    the schedule output stored there). An input its own kind's schedule segment makes has a region per layer
    (FLUX.1's per-block modulations); one only the head's makes is one region every layer reads (FLUX.2's
    shared modulations). Shapes are the same in every profile: [batch, features]."""
    made = {(s["kind"].removesuffix(SCHEDULE), o["name"]) for s in segments if s["kind"].endswith(SCHEDULE)
            for o in s["outputs"]}
    layout, regions, offset, seen = {}, {}, 0, set()
    for seg in segments:
        if seg["kind"] in seen or seg["kind"].endswith(SCHEDULE):
            continue
        seen.add(seg["kind"])
        for layer in seg["layers"]:
            for i in seg["inputs"]:
                if (seg["kind"], i["name"]) in made:
                    region = (seg["kind"], layer, i["name"])
                elif ("head", i["name"]) in made:
                    region = ("head", "", i["name"])
                else:
                    continue
                if region not in regions:
                    regions[region] = offset
                    offset += math.prod(i["shape"])
                layout[(seg["kind"], layer, i["name"])] = (regions[region], i["shape"])
    return layout, list(regions)


class _Clock:
    """Seconds since the last call, by phase (Engine.load's breakdown)."""

    def __init__(self):
        self.seconds, self._last = {}, time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase], self._last = now - self._last, now


def _timed(fn, *args):
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


def _call(seg: dict, fn, weights: list, args: list) -> list:
    """A compiled segment on its weights and inputs, the inputs first checked against the manifest's record of
    them, so that a manifest that does not describe its segments gives a FluxcError, not an Inductor assertion."""
    for spec, t in zip(seg["inputs"], args):
        got = (str(t.dtype).removeprefix("torch."), list(t.shape))
        if got != (spec["dtype"], spec["shape"]):
            raise FluxcError(f"Segment {seg['name']} takes {spec['name']} as {spec['dtype']} {spec['shape']} and was "
                             f"given {got[0]} {got[1]}: its manifest entry does not fit the engine.", REBUILD)
    try:
        # contiguous: Inductor compiled each segment for dense inputs, and a slice such as the image rows of the
        # joint stream keeps its parent's strides (with batch > 1 the artifact's stride assert refuses it)
        outs = fn(*weights, *(t.contiguous() for t in args))
    except AssertionError as e:  # Inductor's size/stride asserts: the manifest does not describe the artifact
        raise FluxcError(f"Segment {seg['name']} refused its inputs ({e}): its manifest entry does not fit its "
                         "compiled artifact.", REBUILD) from None
    if len(outs) != len(seg["outputs"]):
        raise FluxcError(f"Segment {seg['name']} gave {len(outs)} outputs; its manifest lists {len(seg['outputs'])}.",
                         REBUILD)
    return outs


_DTYPE_NAMES = {name: str(dtype).removeprefix("torch.") for dtype, name in SAFETENSORS_DTYPES.items()}  # BF16: bfloat16
_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in SAFETENSORS_DTYPES}  # bfloat16: torch.bfloat16


def _check_entry(f, stored: set, name: str, spec: dict) -> None:
    """Check tensor `name`'s header entry in an open safetensors file against the manifest's spec."""
    if name not in stored:
        raise FluxcError(f"{WEIGHTS} has no tensor {name}, which the manifest names.", REBUILD)
    entry = f.get_slice(name)
    shape, dtype = list(entry.get_shape()), _DTYPE_NAMES.get(entry.get_dtype())
    if shape != spec["shape"] or dtype != spec["dtype"]:
        raise FluxcError(f"{WEIGHTS}: tensor {name} is {dtype} {shape}; the engine was compiled for {spec['dtype']} "
                         f"{spec['shape']}.", REBUILD)


def _check_steps(steps) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise FluxcError(f"steps must be an integer of at least 1, got {steps!r}.", "Use --steps 1 or more (28 is typical).")


def _transformer_only_error() -> FluxcError:
    return FluxcError("This engine was built with --transformer-only: it has no tokenizers, text encoders or VAE.",
                      "Rebuild it without --transformer-only, or pass prompt embeddings "
                      "(`fluxc run --embeddings`, Engine.denoise).")


def _as_output(images: torch.Tensor, output_type: str):
    """Images [N, H, W, 3] in [0, 1] as generate's output_type asks: the tensor, a numpy array, or PIL images."""
    return images if output_type == "pt" else images.numpy() if output_type == "np" else to_pil(images)


def to_pixels(images: torch.Tensor):
    """float [N, H, W, 3] in [0, 1] -> uint8 numpy [N, H, W, 3], rounded as diffusers' numpy_to_pil does."""
    return (images * 255).round().to(torch.uint8).numpy()


def to_pil(images: torch.Tensor) -> list:
    """float [N, H, W, 3] in [0, 1] -> PIL images, rounded as diffusers' numpy_to_pil does."""
    from PIL import Image

    return [Image.fromarray(p) for p in to_pixels(images)]


def run_engine(path: str, method: str, kwargs: dict, load: dict | None = None):
    """Engine.load(path, **load).<method>(**kwargs) on this rank; rank 0 returns the result (on the CPU)."""
    result = getattr(Engine.load(path, **(load or {})), method)(**kwargs)
    if parallel.rank() != 0:
        return None
    return result.cpu() if isinstance(result, torch.Tensor) else result
