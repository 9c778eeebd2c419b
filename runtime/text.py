"""Prompt tokenization as FluxPipeline does it, with the `tokenizers` library alone.

CLIP: `<|startoftext|> ... <|endoftext|>` truncated and padded to 77 tokens; T5: `... </s>` truncated
and padded to the engine's text length. Truncation keeps room for the special tokens, as
transformers' `tokenizer(prompt, padding="max_length", truncation=True)` does.
"""

import os
import warnings

import torch


class PromptTokenizer:
    def __init__(self, root: str, spec: dict, name: str):
        from tokenizers import Tokenizer

        self.name, self.max_length = name, spec["max_length"]
        self.tokenizer = Tokenizer.from_file(os.path.join(root, spec["file"]))
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.enable_padding(length=self.max_length, pad_id=spec["pad_id"], pad_token=spec["pad_token"])

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """Token ids [N, max_length] int64; warns with the dropped text when a prompt is truncated."""
        encodings = self.tokenizer.encode_batch(prompts)
        for prompt, enc in zip(prompts, encodings):
            if enc.overflowing:
                dropped = " ".join(self.tokenizer.decode(o.ids) for o in enc.overflowing)
                warnings.warn(f"Prompt {prompt[:40]!r}... was truncated to {self.max_length} {self.name} tokens; "
                              f"dropped: {dropped!r}", stacklevel=3)
        return torch.tensor([enc.ids for enc in encodings], dtype=torch.long)
