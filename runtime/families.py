"""Model families: what differs between FLUX.1 and FLUX.2 for fluxc's tracer, passes and runtime, in one place.

Both families run as the same four transformer segments (head, double block, single block over the joint
text + image sequence, tail) with the same runtime loop; they differ in what the head computes and hands to
the blocks, and in the position ids behind RoPE:
    FLUX.1  the head embeds timestep, guidance and CLIP's pooled text into temb; every block computes its
            own AdaLN modulation from temb; position ids (0, row, col), text tokens all zero; RoPE theta 10000
    FLUX.2  the head embeds timestep and guidance into temb and computes the modulations all blocks share
            (temb_mod_img, temb_mod_txt for double blocks, temb_mod for single blocks); no pooled text;
            position ids (t, h, w, l): image (0, row, col, 0), text (0, 0, 0, index); RoPE theta from the
            model config (2000)
The tracer's per-family module wrappers are in compiler/trace.py; adding a family is a Family here and its
wrappers there.
"""

import dataclasses

import torch

SEGMENT_KINDS = ("head", "double", "single", "tail")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    pooled: bool  # the head takes pooled_projections (CLIP's pooled prompt embedding)
    outputs: dict  # segment kind -> its output names
    schedule_inputs: dict  # segment kind -> its activation inputs known for every step before the loop

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


_BLOCK_OUTPUTS = {"double": ["encoder_hidden_states", "hidden_states"], "single": ["joint_hidden_states"],
                  "tail": ["noise_pred"]}

FAMILIES = {
    "flux1": Family(
        "flux1", pooled=True,
        outputs={"head": ["hidden_states", "encoder_hidden_states", "temb"], **_BLOCK_OUTPUTS},
        schedule_inputs={"head": ("timestep", "guidance", "pooled_projections"), "double": ("temb",),
                         "single": ("temb",), "tail": ("temb",)}),
    "flux2": Family(
        "flux2", pooled=False,
        outputs={"head": ["hidden_states", "encoder_hidden_states", "temb", "temb_mod_img", "temb_mod_txt", "temb_mod"],
                 **_BLOCK_OUTPUTS},
        schedule_inputs={"head": ("timestep", "guidance"), "double": ("temb_mod_img", "temb_mod_txt"),
                         "single": ("temb_mod",), "tail": ("temb",)}),
}
