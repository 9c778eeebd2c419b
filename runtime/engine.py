"""Engine: load a verified bundle and run the whole FLUX pipeline: prompt -> tokens -> text encoders ->
denoising loop -> VAE decoder -> image.

Imports torch, safetensors and tokenizers only (never diffusers, transformers or the compiler).
Before the loop, the engine's schedule segments (the graphs passes/hoist_schedule.py split off: time
embedding, every block's AdaLN modulation) run once over all steps' rows and give one buffer of
per-step values. On CUDA one whole step (head, every block, tail, Euler update) is captured as one CUDA
graph per profile; the loop then only copies the step's row of that buffer, its timestep and its sigma
delta on the device and replays, so there is no host sync inside the loop. Segments have a static batch:
more prompts than the engine's batch run in chunks, the last one padded by repeating its last prompt.
"""

import math
import os
import time
from contextlib import contextmanager

import torch

from fluxc.runtime import flux_math
from fluxc.runtime.backends import LOADERS
from fluxc.runtime.bundle import ENCODER_PLACEMENTS, WEIGHTS, read_manifest, verify_files
from fluxc.runtime.device import check_runs_here
from fluxc.runtime.errors import FluxcError
from fluxc.runtime.flux_math import Profile

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ENCODER_KINDS = ("clip", "t5")
SCHEDULE = "_schedule"  # kind suffix of a segment hoist_schedule split off its kind's segment


class Engine:
    def __init__(self, path: str, manifest: dict, device: torch.device, encoders: str | None = None):
        self.path, self.manifest, self.device = path, manifest, device
        self.config = manifest["model"]["config"]
        self.dtype = DTYPES["float32" if manifest["precision"] == "fp32" else "bfloat16"]
        self.profiles = {p["name"]: Profile(p["height"], p["width"], p["text_tokens"], p["batch"])
                         for p in manifest["profiles"]}
        self.components = manifest["components"]  # None: transformer only
        self.encoders = self._encoder_placement(encoders)
        self._segments: dict[tuple[str, str | None], tuple[dict, object]] = {}
        # schedule segments in build order (the head's first: its temb feeds the others), and where each
        # loop input they make lives in a step's row of the schedule buffer: (kind, layer, name) -> (offset, shape)
        self._schedule = [s for s in manifest["segments"] if s["kind"].endswith(SCHEDULE)]
        self._layout = _schedule_layout(manifest["segments"])
        self._weights: dict[str, list[torch.Tensor]] = {}
        self._graphs: dict[str, "_GraphedStep"] = {}
        self._tokenizers = {}

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights loaded so far (every segment's, once a generation has run)."""
        return sum(t.numel() * t.element_size() for ts in self._weights.values() for t in ts)

    @classmethod
    def load(cls, path: str, verify: bool = True, encoders: str | None = None) -> "Engine":
        """Validate (format, files and hashes, GPU arch, torch version), then load weights and segments.

        encoders: override where a GPU engine keeps its text encoders between prompts: "gpu" (resident) or
        "offload" (in pinned CPU memory, copied to the GPU for each encode); "cpu" is fixed at build time."""
        manifest = read_manifest(path)
        if verify:
            verify_files(path, manifest)
        device = check_runs_here(manifest)
        engine = cls(path, manifest, device, encoders)
        engine._load_weights()
        loader = LOADERS[manifest["backend"]["name"]]
        for seg in manifest["segments"]:
            engine._segments[(seg["kind"], seg["profile"])] = (seg, loader(os.path.join(path, seg["dir"])))
        if engine.components:
            from fluxc.runtime.text import PromptTokenizer

            engine._tokenizers = {name: PromptTokenizer(path, spec, name.upper())
                                  for name, spec in engine.components["tokenizers"].items()}
        return engine

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
        from safetensors import safe_open

        with safe_open(os.path.join(self.path, WEIGHTS), framework="pt", device="cpu") as f:
            for seg in self.manifest["segments"]:
                place = self._placer(seg)
                for layer in seg["layers"]:
                    prefix = f"{layer}." if layer else ""
                    key = f"{seg['kind']}:{layer}"
                    if key not in self._weights:
                        self._weights[key] = [place(f.get_tensor(prefix + w)) for w in seg["weights"]]

    def _placer(self, seg: dict):
        if seg["device"] == "cpu":
            return torch.Tensor.clone  # Inductor CPU kernels want aligned inputs; mmap'd slices may not be
        if seg["kind"] in ENCODER_KINDS and self.encoders == "offload":
            return torch.Tensor.pin_memory
        return lambda t: t.to(self.device)

    # ---- one transformer forward -------------------------------------------------------------
    def profile_for(self, height: int | None = None, width: int | None = None) -> Profile:
        """The profile of that size; a side left None takes the first profile's."""
        name = f"{height or self._first.height}x{width or self._first.width}"
        if name not in self.profiles:
            raise FluxcError(f"This engine has no {name} profile; it was built for {', '.join(self.profiles)}.",
                             f"Use one of those sizes, or rebuild with --resolution {name}.")
        return self.profiles[name]

    def rope(self, profile: Profile) -> tuple[torch.Tensor, torch.Tensor]:
        ids = flux_math.position_ids(profile)
        cos, sin = flux_math.rope_tables(ids, tuple(self.config["axes_dims_rope"]))
        return cos.to(self.device), sin.to(self.device)

    def _run(self, kind: str, profile: Profile | None, layer: str, acts: dict) -> dict[str, torch.Tensor]:
        """One segment for one layer: inputs by name from `acts` (or from the step's schedule row), outputs by name."""
        seg, fn = self._segments[(kind, profile and profile.name)]
        args = []
        for i in seg["inputs"]:
            where = self._layout.get((kind, layer, i["name"]))
            if where is None:
                args.append(acts[i["name"]])
            else:
                offset, shape = where
                args.append(acts["schedule"].narrow(0, offset, math.prod(shape)).view(shape))
        outs = fn(*self._weights[f"{kind}:{layer}"], *args)
        return dict(zip((o["name"] for o in seg["outputs"]), outs))

    def _rows(self, kind: str, profile: Profile | None, layer: str, names: list[str]):
        """fn(*tensors) -> the segment's outputs as a list, the tensors being its inputs `names`: for _chunked."""
        return lambda *xs: list(self._run(kind, profile, layer, dict(zip(names, xs))).values())

    def schedule(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        """Every step's schedule row at once: timestep [steps, B], guidance [B] (guidance-distilled models),
        pooled [B, 768] -> [steps, row] (an empty row for an engine built without hoist_schedule)."""
        steps = timestep.shape[0]
        values = {"timestep": timestep.reshape(-1), "pooled_projections": pooled.repeat(steps, 1)}
        if guidance is not None:
            values["guidance"] = guidance.repeat(steps)
        rows = {}
        for seg in self._schedule:
            names = [i["name"] for i in seg["inputs"]]
            chunk = seg["inputs"][0]["shape"][0]  # compiled for this many rows: steps x batch run in chunks
            loop_kind = seg["kind"].removesuffix(SCHEDULE)
            for layer in seg["layers"]:
                outs = _chunked(self._rows(seg["kind"], None, layer, names), chunk, *(values[n] for n in names))
                for o, out in zip(seg["outputs"], outs):
                    key = (loop_kind, layer, o["name"])
                    if key in self._layout:
                        rows[key] = out
                    else:  # the head's temb: an input of the other schedule segments
                        values[o["name"]] = out
        if not self._layout:
            return timestep.new_empty(steps, 0)
        return torch.cat([rows[key].reshape(steps, -1) for key in self._layout], dim=1)

    def transformer(self, profile: Profile, acts: dict) -> torch.Tensor:
        """acts: hidden_states [B, S, 64], encoder_hidden_states [B, T, 4096], pooled_projections [B, 768],
        timestep [B], guidance [B] (if the model is guidance-distilled), rope_cos/rope_sin [T+S, 128];
        optionally `schedule`, this step's row of Engine.schedule (else computed here)."""
        acts = dict(acts)
        if "schedule" not in acts:
            acts["schedule"] = self.schedule(acts["timestep"][None], acts.get("guidance"), acts["pooled_projections"])[0]
        acts |= self._run("head", profile, "", acts)
        for layer in self._segments[("double", profile.name)][0]["layers"]:
            acts |= self._run("double", profile, layer, acts)
        acts["joint_hidden_states"] = torch.cat([acts["encoder_hidden_states"], acts["hidden_states"]], dim=1)
        for layer in self._segments[("single", profile.name)][0]["layers"]:
            acts |= self._run("single", profile, layer, acts)
        acts["hidden_states"] = acts["joint_hidden_states"][:, profile.text_tokens:]  # [B, S, C]
        return self._run("tail", profile, "", acts)["noise_pred"]

    # ---- text to image ---------------------------------------------------------------------------
    def generate(self, prompt: str | list[str], *, height: int | None = None, width: int | None = None,
                 steps: int = 28, guidance: float = 3.5, seed: int = 0, generator: torch.Generator | None = None,
                 max_sequence_length: int | None = None, output_type: str = "pil", timings: dict | None = None):
        """Images for one prompt or a list, as FluxPipeline(prompt, ...) makes them.

        height/width default to the engine's first profile; the initial noise for all prompts is drawn at
        once from `generator` (default: a CPU generator seeded with `seed`), so an engine of any batch size
        gives the same images as FluxPipeline with the whole list. output_type: "pil" (list of PIL images),
        "np" (float32 [N, H, W, 3] in [0, 1]) or "pt" (the same as a tensor). `timings`, if given, receives
        the seconds of each stage (encode, denoise, decode)."""
        prompts = self._check_prompts(prompt)
        profile = self.profile_for(height, width)
        self._check_sampling(steps, guidance, max_sequence_length, output_type)
        stage = _StageClock(self.device, timings)
        with stage("encode"):
            prompt_embeds, pooled = self.encode_prompt(prompts)
        with stage("denoise"):
            channels = self.config["in_channels"] // 4
            noise = flux_math.initial_noise(len(prompts), profile, channels, seed if generator is None else generator,
                                             self.dtype)
            latents = _chunked(lambda e, p, z: [self.denoise(e, p, height=profile.height, width=profile.width,
                                                             steps=steps, guidance=guidance, latents=z)],
                               profile.batch, prompt_embeds, pooled, noise)[0]
        with stage("decode"):
            images = self.decode(latents, profile)
        if output_type == "pt":
            return images
        if output_type == "np":
            return images.numpy()
        return to_pil(images)

    @property
    def _first(self) -> Profile:
        return next(iter(self.profiles.values()))

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt_embeds [N, T, 4096] from T5 and pooled_prompt_embeds [N, 768] from CLIP, as
        FluxPipeline.encode_prompt gives them, on the engine's device."""
        if self.components is None:
            raise _transformer_only_error()
        clip_ids, t5_ids = self._tokenizers["clip"](prompts), self._tokenizers["t5"](prompts)  # [N, 77], [N, T]
        batch = self._first.batch
        with self._encoders_loaded():
            pooled, = _chunked(self._rows("clip", None, "text_encoder", ["input_ids"]), batch,
                               clip_ids.to(self._encoder_device))
            embeds, = _chunked(self._rows("t5", None, "text_encoder_2", ["input_ids"]), batch,
                               t5_ids.to(self._encoder_device))
        return embeds.to(self.device), pooled.to(self.device)

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
        """Packed latents [N, S, 64] -> float32 images [N, H, W, 3] in [0, 1] on the CPU (the VAE segment)."""
        if self.components is None:
            raise _transformer_only_error()
        unpacked = flux_math.unpack_latents(latents, profile.height, profile.width)  # [N, 16, H/8, W/8]
        images, = _chunked(self._rows("vae", profile, "vae", ["latents"]), profile.batch, unpacked)
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
        text = self.components["tokenizers"]["t5"]["max_length"]
        if max_sequence_length not in (None, text):
            raise FluxcError(f"This engine encodes prompts to {text} T5 tokens, not {max_sequence_length}: its "
                             "segments have static shapes.", f"Drop max_sequence_length, or rebuild with --text-tokens {max_sequence_length}.")
        if output_type not in ("pil", "np", "pt"):
            raise FluxcError(f"Unknown output_type {output_type!r}.", "Use pil, np or pt.")

    # ---- the denoising loop --------------------------------------------------------------------
    def denoise(self, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor, *, height: int, width: int,
                steps: int = 28, guidance: float = 3.5, seed: int = 0, latents: torch.Tensor | None = None,
                cuda_graph: bool = True) -> torch.Tensor:
        """Packed latents [B, S, 64] after `steps` flow-matching Euler steps, as FluxPipeline(output_type="latent").

        latents: the packed initial noise [B, S, 64] (default: drawn from `seed`).
        cuda_graph=False runs the same step eagerly on CUDA (for debugging and for tests of the graph)."""
        profile = self.profile_for(height, width)
        self._check_embeddings(profile, prompt_embeds, pooled_prompt_embeds)
        _check_steps(steps)
        if latents is None:
            latents = flux_math.initial_noise(profile.batch, profile, self.config["in_channels"] // 4, seed, self.dtype)
        sig = flux_math.sigmas(steps, profile.image_tokens)  # [steps + 1] f32
        timesteps = (sig[:-1] * 1000).to(self.dtype) / 1000  # as FluxPipeline rounds t before /1000
        state = {
            "hidden_states": latents.to(self.device, self.dtype),
            "encoder_hidden_states": prompt_embeds.to(self.device, self.dtype),
            "pooled_projections": pooled_prompt_embeds.to(self.device, self.dtype),
        }
        if self.config["guidance_embeds"]:
            state["guidance"] = torch.full((profile.batch,), float(guidance), device=self.device)
        per_step = {
            "timestep": timesteps[:, None].expand(steps, profile.batch).to(self.device),
            "dt": (sig[1:] - sig[:-1]).to(self.device),  # [steps] f32
        }
        per_step["schedule"] = self.schedule(per_step["timestep"], state.get("guidance"), state["pooled_projections"])
        state |= {k: v[0].clone() for k, v in per_step.items()}
        state["rope_cos"], state["rope_sin"] = self.rope(profile)

        graphed = self._graphed_step(profile, state) if self.device.type == "cuda" and cuda_graph else None
        if graphed is not None:
            graphed.load(state)
            state = graphed.static
        for i in range(steps):
            for k, v in per_step.items():
                state[k].copy_(v[i])  # device to device: no host sync
            if graphed is not None:
                graphed.graph.replay()
            else:
                self._euler_step(profile, state)
        return state["hidden_states"].clone()

    def _euler_step(self, profile: Profile, state: dict) -> None:
        noise_pred = self.transformer(profile, state)
        latents = state["hidden_states"]
        latents.copy_(flux_math.euler_step(latents, noise_pred, state["dt"]))

    def _graphed_step(self, profile: Profile, state: dict) -> "_GraphedStep":
        if profile.name not in self._graphs:
            self._graphs[profile.name] = _GraphedStep(self, profile, state)
        return self._graphs[profile.name]

    def _check_embeddings(self, profile: Profile, prompt_embeds, pooled) -> None:
        want_t = (profile.batch, profile.text_tokens, self.config["joint_attention_dim"])
        want_p = (profile.batch, self.config["pooled_projection_dim"])
        for name, t, want in (("prompt_embeds", prompt_embeds, want_t), ("pooled_prompt_embeds", pooled, want_p)):
            if tuple(t.shape) != want:
                raise FluxcError(f"{name} has shape {tuple(t.shape)}; this engine takes {want}.",
                                 "Encode prompts with the text encoders this engine's model was trained with, "
                                 "padded to the engine's text length.")


def _schedule_layout(segments: list[dict]) -> dict[tuple[str, str, str], tuple[int, list[int]]]:
    """(kind, layer, input name) -> (offset, shape) in a step's schedule row, for every loop-segment input a
    schedule segment makes (the shape is the same in every profile: [batch, features])."""
    made = {(s["kind"].removesuffix(SCHEDULE), o["name"]) for s in segments if s["kind"].endswith(SCHEDULE)
            for o in s["outputs"]}
    layout, offset, seen = {}, 0, set()
    for seg in segments:
        if seg["kind"] in seen or seg["kind"].endswith(SCHEDULE):
            continue
        seen.add(seg["kind"])
        for layer in seg["layers"]:
            for i in seg["inputs"]:
                if (seg["kind"], i["name"]) in made:
                    layout[(seg["kind"], layer, i["name"])] = (offset, i["shape"])
                    offset += math.prod(i["shape"])
    return layout


def _check_steps(steps) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise FluxcError(f"steps must be an integer of at least 1, got {steps!r}.", "Use --steps 1 or more (28 is typical).")


def _transformer_only_error() -> FluxcError:
    return FluxcError("This engine was built with --transformer-only: it has no tokenizers, text encoders or VAE.",
                      "Rebuild it without --transformer-only, or pass prompt embeddings "
                      "(`fluxc run --embeddings`, Engine.denoise).")


def _chunked(fn, batch: int, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """fn over rows of `inputs` in chunks of the segments' static batch; the last chunk is padded by
    repeating its last row, and the padding is dropped from the concatenated outputs."""
    n = inputs[0].shape[0]
    outs = []
    for start in range(0, n, batch):
        chunk = [x[start:start + batch] for x in inputs]
        pad = batch - chunk[0].shape[0]
        if pad:
            chunk = [torch.cat([x, x[-1:].expand(pad, *x.shape[1:])]) for x in chunk]
        outs.append([y[:batch - pad] for y in fn(*chunk)])
    return [ys[0] if len(ys) == 1 else torch.cat(ys) for ys in zip(*outs)]


def to_pil(images: torch.Tensor) -> list:
    """float [N, H, W, 3] in [0, 1] -> PIL images, rounded as diffusers' numpy_to_pil does."""
    from PIL import Image

    pixels = (images * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(p) for p in pixels]


class _StageClock:
    """Wall seconds per stage into `timings` (synchronizing the GPU at stage ends), or nothing."""

    def __init__(self, device: torch.device, timings: dict | None):
        self.device, self.timings = device, timings

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        if self.timings is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings[name] = time.perf_counter() - start


class _GraphedStep:
    """One Euler step captured as a CUDA graph over static input buffers."""

    def __init__(self, engine: Engine, profile: Profile, state: dict):
        self.static = {k: v.clone() for k, v in state.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside capture: lazy init, autotuning
            for _ in range(2):
                engine._euler_step(profile, self.static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            engine._euler_step(profile, self.static)

    def load(self, state: dict) -> None:
        """Copy the caller's inputs into the captured buffers (the warm-up changed them)."""
        for k, v in state.items():
            self.static[k].copy_(v)
