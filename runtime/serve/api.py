"""Request and response bodies of the OpenAI images API, with fluxc's own fields (OpenAI's `extra_body`).

OpenAI's sizes are "WIDTHxHEIGHT"; fluxc's profiles (and `fluxc build --resolution`) are HEIGHTxWIDTH. Errors use
OpenAI's body, {"error": {"message", "type", "param", "code"}}, so existing clients raise their usual exceptions.
"""

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fluxc.runtime.core.cache_config import POLICIES
from fluxc.runtime.core.errors import FluxcError


class LoraRef(BaseModel):
    """One adapter a request asks for: a name the server registered (`fluxc serve --lora NAME=FILE`) and its scale."""

    model_config = ConfigDict(extra="forbid")

    name: str
    scale: float = 1.0


class ImagesRequest(BaseModel):
    """POST /v1/images/generations. OpenAI fields not listed are refused (422), as OpenAI refuses unknown ones."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None  # "WIDTHxHEIGHT"; default: the engine's first profile
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = None  # accepted and ignored, as OpenAI's abuse-monitoring id
    # fluxc's own (extra_body={...} in OpenAI's client)
    steps: int = 28
    guidance: float = 3.5
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)  # None: a random seed, returned with the image
    cache: Literal[POLICIES] | None = None  # step skipping; default: the engine's policy
    cache_threshold: float | None = None
    lora: list[LoraRef] = []  # LoRA adapters for this request's images; [] the base model


class EditRequest(ImagesRequest):
    """POST /v1/images/edits, as multipart form fields (the image and the optional mask are file fields beside
    them): OpenAI's fields and fluxc's, plus the strength of image to image and inpainting."""

    strength: float = 0.6


class Image(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int  # fluxc: the seed that reproduces this image


class ImagesResponse(BaseModel):
    created: int
    data: list[Image]


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fluxc"
    # fluxc: what the engine serves
    sizes: list[str]  # OpenAI's WIDTHxHEIGHT
    batch: int
    max_n: int
    max_steps: int
    cache: str
    adapters: list[str]  # the LoRA adapters requests may name


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def openai_size(profile) -> str:
    return f"{profile.width}x{profile.height}"


def parse_size(size: str | None, profiles) -> tuple[int | None, int | None]:
    """(height, width) of an OpenAI size among the engine's profiles; None: the first profile."""
    if size is None:
        return None, None
    sizes = {openai_size(p): p for p in profiles}
    match = re.fullmatch(r"(\d+)x(\d+)", size)
    if match is None or size not in sizes:
        raise FluxcError(f"size {size!r} is not one of this engine's sizes: {', '.join(sizes)} (WIDTHxHEIGHT, as "
                         "OpenAI writes sizes).", "Ask for one of those sizes, or serve an engine built with "
                         "`fluxc build --resolution HEIGHTxWIDTH` for the size you need.")
    return sizes[size].height, sizes[size].width


def check_request(body: ImagesRequest, settings) -> None:
    """The limits the server sets on top of the engine's own checks (Engine.check_generation: size, guidance, cache)."""
    if not body.prompt.strip():
        raise FluxcError("The prompt is empty.", "Describe the image in `prompt`.")
    if len(body.prompt) > settings.max_prompt_chars:
        raise FluxcError(f"The prompt has {len(body.prompt)} characters; this server takes at most "
                         f"{settings.max_prompt_chars}.", "Shorten the prompt (T5 keeps its first 512 tokens anyway).")
    if not 1 <= body.n <= settings.max_n:
        raise FluxcError(f"n is {body.n}; this server makes 1 to {settings.max_n} images per request.",
                         f"Ask for at most {settings.max_n} images, in several requests if you need more.")
    if not 1 <= body.steps <= settings.max_steps:
        raise FluxcError(f"steps is {body.steps}; this server runs 1 to {settings.max_steps} steps.",
                         "Use e.g. steps=28 (FLUX.1-dev) or 4 (schnell).")
    registered = dict(settings.adapters)
    for ref in body.lora:
        if ref.name not in registered:
            raise FluxcError(f"No adapter named {ref.name!r} is registered on this server"
                             + (f" (it has {', '.join(registered)})." if registered else " (it has none)."),
                             "Name a registered adapter, or start the server with --lora NAME=FILE.")
        if not math.isfinite(ref.scale):
            raise FluxcError(f"Adapter {ref.name}'s scale is {ref.scale}.", "Use a finite scale, e.g. 0.8.")
    if len({ref.name for ref in body.lora}) != len(body.lora):
        raise FluxcError("An adapter is named twice in `lora`.", "Name each adapter once, with its scale.")
    if body.response_format == "url":
        raise FluxcError("response_format 'url' is not served: fluxc keeps no image store to link to.",
                         "Ask for response_format='b64_json' (the image is in the response).")
