"""Model families: what differs between FLUX.1 and FLUX.2 for fluxc's tracer, passes and runtime, in one place.

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
The tracer's per-family module wrappers are in compiler/trace.py; adding a family is a Family here and its
wrappers there.
"""

import dataclasses

import torch

from fluxc.runtime import flux_math

SEGMENT_KINDS = ("head", "double", "single", "tail")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    pooled: bool  # the head takes pooled_projections (CLIP's pooled prompt embedding)
    outputs: dict  # segment kind -> its output names
    schedule_inputs: dict  # segment kind -> its activation inputs known for every step before the loop
    encoders: tuple  # text-encoder segment kinds, run in order; together they give prompt_embeds (and pooled)

    def position_ids(self, text_tokens: int, rows: int, cols: int) -> torch.Tensor:
        """[T + S, axes] float ids of the text tokens, then the image tokens row by row."""
        r = torch.arange(rows).repeat_interleave(cols)
        c = torch.arange(cols).repeat(rows)
        zeros_s, zeros_t = torch.zeros(rows * cols, dtype=torch.long), torch.zeros(text_tokens, dtype=torch.long)
        if self.name == "flux1":
            img, txt = torch.stack([zeros_s, r, c], 1), torch.zeros(text_tokens, 3, dtype=torch.long)
        else:
            img = torch.stack([zeros_s, r, c, zeros_s], 1)
            txt = torch.stack([zeros_t, zeros_t, zeros_t, torch.arange(text_tokens)], 1)
        return torch.cat([txt, img]).float()

    def initial_noise(self, n: int, profile, in_channels: int, gen: torch.Generator, dtype) -> torch.Tensor:
        """Packed noise [n, S, in_channels] as the family's diffusers pipeline draws it from `gen`."""
        h, w = profile.height // flux_math.VAE_SCALE, profile.width // flux_math.VAE_SCALE
        if self.name == "flux1":
            noise = torch.randn((n, in_channels // 4, h, w), generator=gen, dtype=dtype, device=gen.device)
            return flux_math.pack_latents(noise)
        noise = torch.randn((n, in_channels, h // 2, w // 2), generator=gen, dtype=dtype, device=gen.device)
        return noise.flatten(2).transpose(1, 2).contiguous()

    def unpack_latents(self, packed: torch.Tensor, profile) -> torch.Tensor:
        """Packed tokens [B, S, C] as the latent image the family's VAE side starts from: FLUX.1 [B, C/4, H/8, W/8]
        (flux_math.unpack_latents); FLUX.2 the patchified grid [B, C, H/16, W/16] (Flux2Pipeline then
        de-normalizes with the VAE's batch-norm statistics and unpatchifies)."""
        if self.name == "flux1":
            return flux_math.unpack_latents(packed, profile.height, profile.width)
        b, _, c = packed.shape
        return packed.transpose(1, 2).reshape(b, c, profile.height // 16, profile.width // 16).contiguous()

    def mu(self, image_tokens: int, steps: int) -> float:
        """The schedule's resolution-dependent shift (the sigmas are shifted to e^mu / (e^mu + 1/s - 1))."""
        if self.name == "flux1":
            slope = (flux_math.MAX_SHIFT - flux_math.BASE_SHIFT) / (flux_math.MAX_SEQ_LEN - flux_math.BASE_SEQ_LEN)
            return image_tokens * slope + (flux_math.BASE_SHIFT - slope * flux_math.BASE_SEQ_LEN)
        # BFL's FLUX.2 sampling.py (diffusers' compute_empirical_mu): two lines fitted at 10 and 200 steps
        a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
        if image_tokens > 4300:
            return a2 * image_tokens + b2
        m_200, m_10 = a2 * image_tokens + b2, a1 * image_tokens + b1
        a = (m_200 - m_10) / 190.0
        return a * steps + (m_200 - 200.0 * a)


_BLOCK_OUTPUTS = {"double": ["encoder_hidden_states", "hidden_states"], "single": ["joint_hidden_states"],
                  "tail": ["noise_pred"]}

FAMILIES = {
    "flux1": Family(
        "flux1", pooled=True,
        outputs={"head": ["hidden_states", "encoder_hidden_states", "temb"], **_BLOCK_OUTPUTS},
        schedule_inputs={"head": ("timestep", "guidance", "pooled_projections"), "double": ("temb",),
                         "single": ("temb",), "tail": ("temb",)},
        encoders=("clip", "t5")),
    "flux2": Family(
        "flux2", pooled=False,
        outputs={"head": ["hidden_states", "encoder_hidden_states", "temb", "temb_mod_img", "temb_mod_txt", "temb_mod"],
                 **_BLOCK_OUTPUTS},
        schedule_inputs={"head": ("timestep", "guidance"), "double": ("temb_mod_img", "temb_mod_txt"),
                         "single": ("temb_mod",), "tail": ("temb",)},
        encoders=("mistral",)),
}

ENCODER_KINDS = tuple(kind for family in FAMILIES.values() for kind in family.encoders)  # every family's
