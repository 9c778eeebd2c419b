"""Model families: every difference between FLUX.1 and FLUX.2 that the tracer, the passes and the runtime see.

Both families run as the same four transformer segments (head, double block, single block over the joint
text + image sequence, tail) with the same runtime loop; they differ in what the head computes and hands to
the blocks, and in the position ids behind RoPE:
    FLUX.1  the head embeds timestep, guidance and CLIP's pooled text into temb; every block computes its
            own AdaLN modulation from temb; position ids (0, row, col), text tokens all zero; RoPE theta 10000
            latents: noise [B, 16, H/8, W/8] packed 2x2 into tokens; schedule shift mu linear in the image
            tokens (FluxPipeline)
    FLUX.2  the head embeds timestep and guidance into temb and computes the modulations all blocks share
            (temb_mod_img, temb_mod_txt for double blocks, temb_mod for single blocks); no pooled text;
            position ids (t, h, w, l): image (0, row, col, 0), text (0, 0, 0, index); RoPE theta from the
            model config (2000); latents: noise drawn already patchified [B, 128, H/16, W/16], flattened
            into tokens; mu from BFL's empirical fit over image tokens and steps (Flux2Pipeline)
Text encoders: FLUX.1 CLIP-L (pooled) and T5 (prompt_embeds); FLUX.2 one Mistral3 language model whose chat-
formatted prompt's hidden states of three layers make prompt_embeds. The VAE segment takes what
unpack_latents gives (FLUX.2's undoes the batch-norm statistics and the 2x2 patches itself).
The tracer's per-family module wrappers are in compiler/frontend/trace.py; adding a family is a Family here and
its wrappers there.
"""

import torch

from fluxc.runtime.core import flux_math
from fluxc.runtime.core.errors import FluxcError
from fluxc.runtime.core.profile import VAE_SCALE, Profile

SEGMENT_KINDS = ("head", "double", "single", "tail")
_BLOCK_OUTPUTS = {"double": ["encoder_hidden_states", "hidden_states"], "single": ["joint_hidden_states"],
                  "tail": ["noise_pred"]}


class Family:
    name: str
    pooled: bool  # the head takes pooled_projections (CLIP's pooled prompt embedding)
    outputs: dict  # segment kind -> its output names
    schedule_inputs: dict  # segment kind -> its activation inputs known for every step before the loop
    conditioning_widths: dict  # a block's per-step conditioning input -> its width in multiples of the inner dim
    encoders: tuple  # text-encoder segment kinds, run in order; together they give prompt_embeds (and pooled)
    rope_axes: int  # position id axes (len of the config's axes_dims_rope)

    def position_ids(self, profile: Profile) -> torch.Tensor:
        """[T + S, axes] float ids of the text tokens, then the image tokens row by row."""
        rows, cols = profile.height // 16, profile.width // 16
        r, c = torch.arange(rows).repeat_interleave(cols), torch.arange(cols).repeat(rows)
        ids = [self._text_ids(profile.text_tokens), self._image_ids(r, c)]
        for i in range(profile.references):  # the references' tokens, each its own first-axis (time) coordinate
            ids.append(self._image_ids(r, c).index_fill(1, torch.tensor([0]), self.reference_time(i)))
        return torch.cat(ids).float()

    def reference_time(self, i: int) -> int:
        """The first position-id axis of reference image i's tokens."""
        raise NotImplementedError

    def pack_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """A latent grid as the transformer's tokens [B, S, C] (FLUX.1: 2x2 patches; FLUX.2: patchified already)."""
        raise NotImplementedError

    def rope_theta(self, config: dict) -> float:
        raise NotImplementedError

    def sigmas(self, steps: int, image_tokens: int) -> torch.Tensor:
        """[steps + 1] float32: the flow-matching schedule, shifted by the family's mu."""
        return flux_math.shifted_sigmas(steps, self.mu(image_tokens, steps))

    def initial_noise(self, n: int, profile: Profile, in_channels: int, seed: "int | torch.Generator",
                      dtype: torch.dtype) -> torch.Tensor:
        """Packed noise [n, S, in_channels] as the family's diffusers pipeline draws it from the generator (a CPU
        generator seeded with `seed` when given an int), on the generator's device."""
        raise NotImplementedError

    def unpack_latents(self, packed: torch.Tensor, profile: Profile) -> torch.Tensor:
        """Packed tokens [B, S, C] as the latent image the family's VAE side starts from."""
        raise NotImplementedError

    def mu(self, image_tokens: int, steps: int) -> float:
        """The schedule's resolution-dependent shift (the sigmas are shifted to e^mu / (e^mu + 1/s - 1))."""
        raise NotImplementedError


class Flux1(Family):
    name, pooled, encoders, rope_axes = "flux1", True, ("clip", "t5"), 3
    outputs = {"head": ["hidden_states", "encoder_hidden_states", "temb"], **_BLOCK_OUTPUTS}
    schedule_inputs = {"head": ("timestep", "guidance", "pooled_projections"), "double": ("temb",),
                       "single": ("temb",), "tail": ("temb",)}
    conditioning_widths = {"temb": 1}  # every block computes its own AdaLN modulation from temb
    # FluxPipeline / FlowMatchEulerDiscreteScheduler constants
    BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15

    def _text_ids(self, text_tokens: int) -> torch.Tensor:
        return torch.zeros(text_tokens, 3, dtype=torch.long)

    def _image_ids(self, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.zeros_like(r), r, c], 1)

    def reference_time(self, i):
        return 1  # FluxKontextPipeline: image_ids[..., 0] = 1 (one reference)

    def pack_grid(self, grid):
        return flux_math.pack_latents(grid)

    def rope_theta(self, config):
        return flux_math.ROPE_THETA  # fixed in FluxTransformer2DModel: a config entry would not change diffusers

    def initial_noise(self, n, profile, in_channels, seed, dtype):
        """FluxPipeline: one randn of [n, C/4, H/8, W/8], packed 2x2."""
        gen = flux_math.generator(seed)
        h, w = profile.height // VAE_SCALE, profile.width // VAE_SCALE
        noise = torch.randn((n, in_channels // 4, h, w), generator=gen, dtype=dtype, device=gen.device)
        return flux_math.pack_latents(noise)

    def unpack_latents(self, packed, profile):
        """[B, C/4, H/8, W/8]."""
        return flux_math.unpack_latents(packed, profile.height, profile.width)

    def mu(self, image_tokens, steps):
        slope = (self.MAX_SHIFT - self.BASE_SHIFT) / (self.MAX_SEQ_LEN - self.BASE_SEQ_LEN)
        return image_tokens * slope + (self.BASE_SHIFT - slope * self.BASE_SEQ_LEN)


class Flux2(Family):
    name, pooled, encoders, rope_axes = "flux2", False, ("mistral",), 4
    outputs = {"head": ["hidden_states", "encoder_hidden_states", "temb", "temb_mod_img", "temb_mod_txt", "temb_mod"],
               **_BLOCK_OUTPUTS}
    schedule_inputs = {"head": ("timestep", "guidance"), "double": ("temb_mod_img", "temb_mod_txt"),
                       "single": ("temb_mod",), "tail": ("temb",)}
    conditioning_widths = {"temb": 1, "temb_mod_img": 6, "temb_mod_txt": 6, "temb_mod": 3}  # shift, scale, gate (x2)

    def _text_ids(self, text_tokens: int) -> torch.Tensor:
        zeros = torch.zeros(text_tokens, dtype=torch.long)
        return torch.stack([zeros, zeros, zeros, torch.arange(text_tokens)], 1)

    def _image_ids(self, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros_like(r)
        return torch.stack([zeros, r, c, zeros], 1)

    def reference_time(self, i):
        return 10 + 10 * i  # Flux2Pipeline._prepare_image_ids: scale + scale * i, scale 10

    def pack_grid(self, grid):
        return grid.flatten(2).transpose(1, 2).contiguous()

    def rope_theta(self, config):
        return config["rope_theta"]

    def initial_noise(self, n, profile, in_channels, seed, dtype):
        """Flux2Pipeline: randn already patchified, [n, C, H/16, W/16], flattened into tokens."""
        gen = flux_math.generator(seed)
        h, w = profile.height // 16, profile.width // 16
        noise = torch.randn((n, in_channels, h, w), generator=gen, dtype=dtype, device=gen.device)
        return self.pack_grid(noise)

    def unpack_latents(self, packed, profile):
        """The patchified grid [B, C, H/16, W/16] (Flux2Pipeline then de-normalizes with the VAE's batch-norm
        statistics and unpatchifies: the VAE segment does that)."""
        b, _, c = packed.shape
        return packed.transpose(1, 2).reshape(b, c, profile.height // 16, profile.width // 16).contiguous()

    def mu(self, image_tokens, steps):
        # BFL's FLUX.2 sampling.py (diffusers' compute_empirical_mu): two lines fitted at 10 and 200 steps
        a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
        if image_tokens > 4300:
            return a2 * image_tokens + b2
        m_200, m_10 = a2 * image_tokens + b2, a1 * image_tokens + b1
        a = (m_200 - m_10) / 190.0
        return a * steps + (m_200 - 200.0 * a)


FAMILIES = {f.name: f for f in (Flux1(), Flux2())}
ENCODER_KINDS = tuple(kind for family in FAMILIES.values() for kind in family.encoders)  # every family's


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise FluxcError(f"Unknown model family '{name}'.", "Use one of: " + ", ".join(FAMILIES) + ".")
    return FAMILIES[name]
