"""Profile: one static shape an engine is compiled for."""

import dataclasses

VAE_SCALE = 8  # pixels per latent pixel; latents are packed 2x2 more, so one token is 16x16 pixels


@dataclasses.dataclass(frozen=True)
class Profile:
    """With world_size > 1 (context parallelism) each rank holds 1/world_size of the text tokens and of the image
    tokens (runtime/parallel.py): the local counts."""

    height: int
    width: int
    text_tokens: int
    batch: int = 1
    world_size: int = 1
    references: int = 0  # reference images of the same size in the image stream (FLUX.1 Kontext: 1; FLUX.2: 1 or more)

    @property
    def local_text_tokens(self) -> int:
        return self.text_tokens // self.world_size

    @property
    def local_image_tokens(self) -> int:
        """This rank's tokens of the transformer's image stream (with references: the latents', then theirs)."""
        return self.image_tokens * (1 + self.references) // self.world_size

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}"

    @property
    def image_tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)

    def latent_shape(self, channels: int) -> tuple[int, int, int, int]:
        return (self.batch, channels, self.height // VAE_SCALE, self.width // VAE_SCALE)
