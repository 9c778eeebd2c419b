"""FLUX glue the runtime owns: latent packing, position ids, RoPE tables and the flow-matching schedule.

Written from the FLUX.1 reference (and checked in tests against diffusers' FluxPipeline, scheduler and
FluxPosEmbed), so that production needs no diffusers.
"""

import dataclasses
import math

import torch

# FluxPipeline / FlowMatchEulerDiscreteScheduler constants for FLUX.1
VAE_SCALE = 8  # pixels per latent pixel; latents are packed 2x2 more, so one token is 16x16 pixels
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15
ROPE_THETA = 10000


@dataclasses.dataclass(frozen=True)
class Profile:
    """One static shape an engine is compiled for. With world_size > 1 (context parallelism) each rank holds
    1/world_size of the text tokens and of the image tokens (runtime/parallel.py): the local counts."""

    height: int
    width: int
    text_tokens: int
    batch: int = 1
    world_size: int = 1

    @property
    def local_text_tokens(self) -> int:
        return self.text_tokens // self.world_size

    @property
    def local_image_tokens(self) -> int:
        return self.image_tokens // self.world_size

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}"

    @property
    def image_tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)

    def latent_shape(self, channels: int) -> tuple[int, int, int, int]:
        return (self.batch, channels, self.height // VAE_SCALE, self.width // VAE_SCALE)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, C*4]: each 2x2 patch becomes one token."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # [B, h, w, C, 2, 2]
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, S, C*4] -> [B, C, height/8, width/8]; the inverse of `pack_latents`."""
    b, _, c4 = tokens.shape
    h, w = height // 16, width // 16
    x = tokens.view(b, h, w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # [B, C, h, 2, w, 2]
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def position_ids(profile: Profile, family: str = "flux1") -> torch.Tensor:
    """[T + S, axes] ids of a profile's text and image tokens (runtime/families.py: (0, r, c) for FLUX.1)."""
    from fluxc.runtime.families import FAMILIES

    return FAMILIES[family].position_ids(profile.text_tokens, profile.height // 16, profile.width // 16)


def rope_tables(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int = ROPE_THETA):
    """cos, sin tables [T + S, sum(axes_dim)] in float32, computed in float64.

    Per axis of dimension d: freq_j = theta^(-2j/d), j < d/2; angle = pos * freq, each angle repeated
    twice (interleaved real layout, as the FLUX reference applies it to (x0, x1) pairs).
    """
    cos, sin = [], []
    for axis, d in enumerate(axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # [d/2]
        angles = ids[:, axis].double()[:, None] * freqs[None]  # [N, d/2]
        cos.append(angles.cos().repeat_interleave(2, dim=1))
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, dim=1).float(), torch.cat(sin, dim=1).float()


def sigmas(steps: int, image_tokens: int, family: str = "flux1") -> torch.Tensor:
    """[steps + 1] float32: linear sigmas 1 .. 1/steps, shifted by the family's resolution-dependent mu, then 0."""
    from fluxc.runtime.families import FAMILIES

    mu = FAMILIES[family].mu(image_tokens, steps)
    out = []
    for i in range(steps):
        s = 1.0 - i * (1.0 - 1.0 / steps) / max(steps - 1, 1)
        out.append(math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0)))
    return torch.tensor(out + [0.0], dtype=torch.float32)


def euler_step(latents: torch.Tensor, noise_pred: torch.Tensor, dt) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler.step: f32 sample + dt * prediction, back to the latents' dtype."""
    return (latents.float() + dt * noise_pred).to(latents.dtype)


def initial_noise(n: int, profile: Profile, channels: int, seed: "int | torch.Generator", dtype: torch.dtype,
                  family: str = "flux1") -> torch.Tensor:
    """Packed noise [n, S, C*4] as the family's pipeline draws it (FluxPipeline: one randn of [n, C, H/8, W/8],
    packed 2x2) from the generator (a CPU generator seeded with `seed` when given an int), on its device."""
    from fluxc.runtime.families import FAMILIES

    gen = seed if isinstance(seed, torch.Generator) else torch.Generator("cpu").manual_seed(seed)
    return FAMILIES[family].initial_noise(n, profile, channels * 4, gen, dtype)
