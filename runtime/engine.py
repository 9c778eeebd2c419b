"""Engine: load a verified bundle and run the FLUX denoising loop from prompt embeddings.

Imports torch and safetensors only (never diffusers or the compiler).
On CUDA one whole step (head, every block, tail, Euler update) is captured as one CUDA graph per
profile; the loop then only copies the step's timestep and sigma delta on the device and replays, so
there is no host sync inside the loop.
"""

import os

import torch

from fluxc.runtime import flux_math
from fluxc.runtime.backends import LOADERS
from fluxc.runtime.bundle import WEIGHTS, read_manifest, verify_files
from fluxc.runtime.device import check_runs_here
from fluxc.runtime.errors import FluxcError
from fluxc.runtime.flux_math import Profile

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Engine:
    def __init__(self, path: str, manifest: dict, device: torch.device):
        self.path, self.manifest, self.device = path, manifest, device
        self.config = manifest["model"]["config"]
        self.dtype = DTYPES["float32" if manifest["precision"] == "fp32" else "bfloat16"]
        self.profiles = {p["name"]: Profile(p["height"], p["width"], p["text_tokens"], p["batch"])
                         for p in manifest["profiles"]}
        self._segments: dict[tuple[str, str], tuple[dict, object]] = {}
        self._weights: dict[str, list[torch.Tensor]] = {}
        self._graphs: dict[str, "_GraphedStep"] = {}

    @classmethod
    def load(cls, path: str, verify: bool = True) -> "Engine":
        """Validate (format, files and hashes, GPU arch, torch version), then load weights and segments."""
        manifest = read_manifest(path)
        if verify:
            verify_files(path, manifest)
        device = check_runs_here(manifest)
        engine = cls(path, manifest, device)
        engine._load_weights()
        loader = LOADERS[manifest["backend"]["name"]]
        for seg in manifest["segments"]:
            engine._segments[(seg["kind"], seg["profile"])] = (seg, loader(os.path.join(path, seg["dir"])))
        return engine

    def _load_weights(self) -> None:
        from safetensors.torch import load_file

        # clone on CPU: Inductor CPU kernels want aligned inputs, mmap'd slices may not be
        state = load_file(os.path.join(self.path, WEIGHTS), device=str(self.device))
        if self.device.type == "cpu":
            state = {k: v.clone() for k, v in state.items()}
        for seg in self.manifest["segments"]:
            for layer in seg["layers"]:
                prefix = f"{layer}." if layer else ""
                self._weights.setdefault(f"{seg['kind']}:{layer}", [state[prefix + w] for w in seg["weights"]])

    # ---- one transformer forward -------------------------------------------------------------
    def profile_for(self, height: int, width: int) -> Profile:
        name = f"{height}x{width}"
        if name not in self.profiles:
            raise FluxcError(f"This engine has no {name} profile; it was built for {', '.join(self.profiles)}.",
                             f"Use one of those sizes, or rebuild with --resolution {name}.")
        return self.profiles[name]

    def rope(self, profile: Profile) -> tuple[torch.Tensor, torch.Tensor]:
        ids = flux_math.position_ids(profile)
        cos, sin = flux_math.rope_tables(ids, tuple(self.config["axes_dims_rope"]))
        return cos.to(self.device), sin.to(self.device)

    def _run(self, kind: str, profile: Profile, layer: str, acts: dict) -> list[torch.Tensor]:
        seg, fn = self._segments[(kind, profile.name)]
        return fn(*self._weights[f"{kind}:{layer}"], *(acts[i["name"]] for i in seg["inputs"]))

    def transformer(self, profile: Profile, acts: dict) -> torch.Tensor:
        """acts: hidden_states [B, S, 64], encoder_hidden_states [B, T, 4096], pooled_projections [B, 768],
        timestep [B], guidance [B] (if the model is guidance-distilled), rope_cos/rope_sin [T+S, 128]."""
        acts = dict(acts)
        acts["hidden_states"], acts["encoder_hidden_states"], acts["temb"] = self._run("head", profile, "", acts)
        for kind in ("double", "single"):
            seg, _ = self._segments[(kind, profile.name)]
            for layer in seg["layers"]:
                acts["encoder_hidden_states"], acts["hidden_states"] = self._run(kind, profile, layer, acts)
        return self._run("tail", profile, "", acts)[0]

    # ---- the denoising loop --------------------------------------------------------------------
    def denoise(self, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor, *, height: int, width: int,
                steps: int = 28, guidance: float = 3.5, seed: int = 0, cuda_graph: bool = True) -> torch.Tensor:
        """Packed latents [B, S, 64] after `steps` flow-matching Euler steps, as FluxPipeline(output_type="latent").

        cuda_graph=False runs the same step eagerly on CUDA (for debugging and for tests of the graph)."""
        profile = self.profile_for(height, width)
        self._check_embeddings(profile, prompt_embeds, pooled_prompt_embeds)
        if steps < 1:
            raise FluxcError(f"steps must be at least 1, got {steps}.", "Use --steps 1 or more (28 is typical).")
        sig = flux_math.sigmas(steps, profile.image_tokens)  # [steps + 1] f32
        timesteps = (sig[:-1] * 1000).to(self.dtype) / 1000  # as FluxPipeline rounds t before /1000
        per_step = {
            "timestep": timesteps[:, None].expand(steps, profile.batch).to(self.device),
            "dt": (sig[1:] - sig[:-1]).to(self.device),  # [steps] f32
        }
        state = {
            "hidden_states": flux_math.initial_noise(profile, self.config["in_channels"] // 4, seed, self.dtype).to(self.device),
            "encoder_hidden_states": prompt_embeds.to(self.device, self.dtype),
            "pooled_projections": pooled_prompt_embeds.to(self.device, self.dtype),
            "timestep": per_step["timestep"][0].clone(),
            "dt": per_step["dt"][0].clone(),
        }
        if self.config["guidance_embeds"]:
            state["guidance"] = torch.full((profile.batch,), float(guidance), device=self.device)
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
        # FlowMatchEulerDiscreteScheduler.step: f32 sample + dt * prediction, back to the model dtype
        latents.copy_((latents.float() + state["dt"] * noise_pred).to(latents.dtype))

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
