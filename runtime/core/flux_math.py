"""Family-independent FLUX math the runtime owns: latent packing, RoPE tables, the shifted flow-matching
schedule and the Euler step. What differs between FLUX.1 and FLUX.2 (position ids, noise layout, the
schedule's shift) is in families.py, which builds on these.

Written from the FLUX.1 reference (and checked in tests against diffusers' FluxPipeline, scheduler and
FluxPosEmbed), so that production needs no diffusers.
"""

import math

import torch

from fluxc.runtime.core.errors import FluxcError

ROPE_THETA = 10000  # FLUX.1's; a FLUX.2 config names its own


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


def shifted_sigmas(steps: int, mu: float) -> torch.Tensor:
    """[steps + 1] float32: linear sigmas 1 .. 1/steps, shifted to e^mu / (e^mu + 1/s - 1), then 0."""
    out = []
    for i in range(steps):
        s = 1.0 - i * (1.0 - 1.0 / steps) / max(steps - 1, 1)
        out.append(math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0)))
    return torch.tensor(out + [0.0], dtype=torch.float32)


def euler_step(latents: torch.Tensor, noise_pred: torch.Tensor, dt) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler.step: f32 sample + dt * prediction, back to the latents' dtype."""
    return (latents.float() + dt * noise_pred).to(latents.dtype)


def generator(seed: "int | torch.Generator") -> torch.Generator:
    """The generator noise is drawn from: a CPU generator seeded with `seed`, or the one given."""
    if isinstance(seed, torch.Generator):
        return seed
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise FluxcError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}.", "Use e.g. --seed 0.")
    return torch.Generator("cpu").manual_seed(seed)
