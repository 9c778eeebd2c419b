"""Named build configurations: each is a function returning a frozen `Recipe`.

Derive variants with `dataclasses.replace`; the resolved recipe is serialized into the manifest.
"""

from fluxc.recipes.base import Precision, Recipe, recipe_from_dict
from fluxc.recipes.generic import bf16, bf16_unfused, reference
from fluxc.recipes.sm90 import sm90_fp8, sm90_fp8_attn, sm90_fp8_attn_epilogues, sm90_fp8_epilogues
from fluxc.recipes.sm100 import sm100_nvfp4

RECIPES = {"reference": reference, "bf16": bf16, "bf16_unfused": bf16_unfused, "sm90_fp8": sm90_fp8,
           "sm90_fp8_attn": sm90_fp8_attn, "sm90_fp8_epilogues": sm90_fp8_epilogues,
           "sm90_fp8_attn_epilogues": sm90_fp8_attn_epilogues, "sm100_nvfp4": sm100_nvfp4}
DEFAULT_FOR_PRECISION = {Precision.FP32: "reference", Precision.BF16: "bf16", Precision.FP8: "sm90_fp8",
                         Precision.NVFP4: "sm100_nvfp4"}

__all__ = ["Precision", "Recipe", "RECIPES", "DEFAULT_FOR_PRECISION", "recipe_from_dict"]
