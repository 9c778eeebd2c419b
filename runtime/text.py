"""Prompt tokenization as the family's diffusers pipeline does it, with the `tokenizers` library alone.

FLUX.1: CLIP `<|startoftext|> ... <|endoftext|>` truncated and padded to 77 tokens; T5 `... </s>` truncated
and padded to the engine's text length. Truncation keeps room for the special tokens, as transformers'
`tokenizer(prompt, padding="max_length", truncation=True)` does.
FLUX.2: the prompt (without `[IMG]`) inside the chat template's text around it, as the build rendered it
(`<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]` and `[/INST]`), tokenized without added specials as
`apply_chat_template` does, truncated and padded to the text length on the tokenizer's own sides, with the
attention mask the text encoder takes.
"""

import os
import warnings
from contextlib import contextmanager

import torch

from fluxc.runtime.core.errors import FluxcError
from fluxc.runtime.core.schema import REBUILD


@contextmanager
def _tokenizer_errors(what: str):
    """The tokenizers library's failures on a damaged tokenizer file as a FluxcError: a bare Exception for a file
    it cannot parse, and a Rust panic (pyo3's PanicException, a BaseException) for some it parses wrongly."""
    try:
        yield
    except Exception as e:
        raise FluxcError(f"{what} failed: {e}.", REBUILD) from None
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise FluxcError(f"{what} failed: the tokenizers library panicked ({e}).", REBUILD) from None


class PromptTokenizer:
    def __init__(self, root: str, spec: dict, name: str):
        from tokenizers import Tokenizer

        self.name, self.max_length = name, spec["max_length"]
        self.template, self.strip = spec.get("template"), spec.get("strip", [])
        self.file = spec["file"]
        with _tokenizer_errors(f"Reading the {name} tokenizer {self.file}"):
            self.tokenizer = Tokenizer.from_file(os.path.join(root, self.file))
        if self.tokenizer.token_to_id(spec["pad_token"]) != spec["pad_id"]:
            raise FluxcError(f"The {name} tokenizer's pad token {spec['pad_token']!r} is not token {spec['pad_id']}, "
                             "as the manifest says.", REBUILD)
        self.tokenizer.enable_truncation(self.max_length, direction=spec.get("truncation_side", "right"))
        self.tokenizer.enable_padding(length=self.max_length, pad_id=spec["pad_id"], pad_token=spec["pad_token"],
                                      direction=spec.get("padding_side", "right"))

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask [N, max_length] int64; warns with the dropped text when a prompt is
        truncated."""
        texts = prompts
        if self.template:
            prefix, suffix = self.template
            for s in self.strip:
                texts = [t.replace(s, "") for t in texts]
            texts = [prefix + t + suffix for t in texts]
        with _tokenizer_errors(f"Tokenizing with the {self.name} tokenizer {self.file}"):
            encodings = self.tokenizer.encode_batch(texts, add_special_tokens=self.template is None)
        for prompt, text, enc in zip(prompts, texts, encodings):
            if enc.overflowing:
                warnings.warn(f"Prompt {prompt[:40]!r}... was truncated to {self.max_length} {self.name} tokens; "
                              f"dropped: {self._dropped(text, enc)!r}", stacklevel=3)
        return {"input_ids": torch.tensor([enc.ids for enc in encodings], dtype=torch.long),
                "attention_mask": torch.tensor([enc.attention_mask for enc in encodings], dtype=torch.long)}

    def _dropped(self, text: str, enc) -> str:
        """The prompt's text from the first word truncation cut into (whole words, no special or pad tokens)."""
        starts = [start for o in enc.overflowing for (start, end), special in zip(o.offsets, o.special_tokens_mask)
                  if not special and end > start]
        if not starts:
            return ""
        start = min(starts)
        while start > 0 and not text[start - 1].isspace():  # back to the start of a word the cut split
            start -= 1
        dropped = text[start:]
        if self.template:
            dropped = dropped.removesuffix(self.template[1])
        return dropped.strip()
