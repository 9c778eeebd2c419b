"""The rest of a pipeline: FLUX.1's CLIP-L and T5 text encoders, their tokenizers and VAE; FLUX.2's Mistral3 text
encoder (hidden states of three layers), its chat-template tokenizer and VAE (with batch-norm latent statistics).

`load_components(source, ...)` mirrors `fluxc.frontend.models.load_model`:
- named architectures get seeded random components of the real shapes (CLIP-L, T5-XXL v1.1 encoder,
  the 16-channel FLUX VAE for `flux1-*`; small ones of the same structure for `tiny`) and tokenizers
  built in code from a fixed corpus, because no real tokenizer can be downloaded here;
- a diffusers FLUX folder gives its `text_encoder/`, `text_encoder_2/`, `vae/`, `tokenizer/` and
  `tokenizer_2/` (FLUX.2: `text_encoder/`, `tokenizer/`, `vae/`), weights through safetensors only.
Tokenizers leave here as `tokenizers.Tokenizer` objects: the engine stores them as tokenizer.json files
so the runtime needs only the `tokenizers` library.
"""

import dataclasses
import os

import torch

from fluxc.runtime.core.errors import FluxcError
from fluxc.runtime.core.profile import VAE_SCALE

CLIP_MAX_LENGTH = 77  # CLIP-L's position table; FluxPipeline always pads CLIP to it

_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu",
               projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
_T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
               relative_attention_max_distance=128, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
               is_encoder_decoder=False, use_cache=False)
_FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                 layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                 scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)

# name -> (CLIP text config, T5 config, VAE config); widths match the transformer's pooled/joint dims
_RANDOM = {
    "flux1": (_CLIP_L, _T5_XXL, _FLUX_VAE),
    "tiny": (dict(_CLIP_L, vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, projection_dim=32, hidden_act="gelu"),
             dict(_T5_XXL, vocab_size=256, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4),
             dict(_FLUX_VAE, block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8,
                  sample_size=128)),
}

# A fixed corpus for the in-code tokenizers: deterministic training, real subword behaviour.
_CORPUS = [
    "a photo of a cat sitting on a red chair", "an astronaut riding a horse on the moon, digital art",
    "a bowl of fruit on a wooden table in soft morning light", "portrait of an old man with a beard, oil painting",
    "a city skyline at night with neon signs and rain", "A watercolor landscape: mountains, a lake and pine trees",
    "close-up of a dew drop on a green leaf, macro photography", "The quick brown fox jumps over the lazy dog.",
]


@dataclasses.dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` and how FLUX pads it."""

    tokenizer: object  # tokenizers.Tokenizer, post-processor adds BOS/EOS as the model expects
    pad_id: int
    pad_token: str


@dataclasses.dataclass
class LoadedComponents:
    clip: torch.nn.Module  # transformers CLIPTextModel, eval
    t5: torch.nn.Module  # transformers T5EncoderModel, eval
    vae: torch.nn.Module  # diffusers AutoencoderKL, eval
    clip_tokenizer: Tokenizer
    t5_tokenizer: Tokenizer

    @property
    def encoders(self) -> dict[str, torch.nn.Module]:
        """Text encoders by segment kind."""
        return {"clip": self.clip, "t5": self.t5}

    def prompt_tokenizers(self, text_tokens: int) -> dict[str, dict]:
        """Segment kind -> the runtime's tokenizer spec (runtime/text.py) and its `tokenizers.Tokenizer`."""
        return {"clip": _spec(self.clip_tokenizer, CLIP_MAX_LENGTH), "t5": _spec(self.t5_tokenizer, text_tokens)}


def _spec(tok: Tokenizer, max_length: int, **extra) -> dict:
    return {"tokenizer": tok.tokenizer, "max_length": max_length, "pad_id": tok.pad_id, "pad_token": tok.pad_token,
            **extra}


def load_components(source: str, family: str, *, dtype, device, seed: int = 0) -> LoadedComponents:
    """Components for a named architecture or a diffusers pipeline folder (checked by build validation)."""
    from fluxc.frontend.models import ARCHITECTURES

    if family == "flux2":
        if source in ARCHITECTURES:
            return _random_flux2_components("tiny" if source == "tiny-flux2" else "flux2", dtype, device, seed)
        return _diffusers_flux2_components(source, dtype, device)
    if source in ARCHITECTURES:
        return _random_components("tiny" if source.startswith("tiny") else "flux1", dtype, device, seed)
    return _diffusers_components(source, dtype, device)  # build validation admits no other source here


def _random_components(name: str, dtype, device, seed: int) -> LoadedComponents:
    """Each library's own initialisation under a fixed seed on the target device (so the same weights for
    the same seed, device type and dtype). Its scaled inits matter: with uniform N(0, 1/fan_in) weights
    T5-XXL's unscaled attention logits grow 8x and its 24 layers turn chaotic in bf16."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_cfg, t5_cfg, vae_cfg = _RANDOM[name]
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    assert clip_tok.tokenizer.get_vocab_size() <= clip_cfg["vocab_size"]
    assert t5_tok.tokenizer.get_vocab_size() <= t5_cfg["vocab_size"]
    cuda = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.device(device), torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed + 1)
        clip = CLIPTextModel(CLIPTextConfig(**clip_cfg))
        t5 = T5EncoderModel(T5Config(**t5_cfg))
        vae = AutoencoderKL(**vae_cfg)
    # torch's own to(): diffusers' override warns that the VAE's (empty) list of float32 modules is not kept
    return LoadedComponents(*(torch.nn.Module.to(m, dtype).eval() for m in (clip, t5, vae)), clip_tok, t5_tok)


def _diffusers_components(path: str, dtype, device) -> LoadedComponents:
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    def load(folder, dtype_kwargs):
        return (CLIPTextModel.from_pretrained(folder("text_encoder"), **dtype_kwargs),
                T5EncoderModel.from_pretrained(folder("text_encoder_2"), **dtype_kwargs),
                AutoencoderKL.from_pretrained(folder("vae"), **dtype_kwargs),
                *(AutoTokenizer.from_pretrained(folder(d), use_fast=True) for d in ("tokenizer", "tokenizer_2")))

    clip, t5, vae, *toks = _from_folder(path, "FLUX", ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2",
                                                       "vae"], load, dtype)
    clip_tok, t5_tok = (Tokenizer(t.backend_tokenizer, t.pad_token_id, t.pad_token) for t in toks)
    _check_vae_scale(vae, path)
    return LoadedComponents(clip.to(device).eval(), t5.to(device).eval(), vae.to(device).eval(), clip_tok, t5_tok)


def _check_vae_scale(vae, path: str) -> None:
    """Both FLUX families' VAEs scale images by 8 (4 levels); the runtime's latent sizes assume it (VAE_SCALE)."""
    levels = len(vae.config.block_out_channels)
    if 2 ** (levels - 1) != VAE_SCALE:
        raise FluxcError(f"The VAE in '{path}/vae' has {levels} levels, so it scales images by {2 ** (levels - 1)}; "
                         f"FLUX's VAEs scale by {VAE_SCALE} (4 levels), and fluxc engines are built for that.",
                         "Use the model's own VAE (block_out_channels of 4 entries), or build with --transformer-only.")


def _from_folder(path: str, what: str, needed: list[str], load, dtype):
    """load(folder, from_pretrained dtype/safetensors kwargs) over a diffusers pipeline folder with the `needed`
    subfolders; a missing subfolder or a damaged file becomes a FluxcError that says which."""
    missing = [d for d in needed if not os.path.isdir(os.path.join(path, d))]
    if missing:
        raise FluxcError(f"'{path}' lacks the pipeline folders {missing}.",
                         f"Pass the root of a diffusers {what} pipeline folder, or build with --transformer-only.")
    try:
        return load(lambda d: os.path.join(path, d), dict(torch_dtype=dtype, use_safetensors=True,
                                                          local_files_only=True))
    except Exception as e:  # OSError, ValueError, SafetensorError: missing or damaged files
        raise FluxcError(f"Cannot load the pipeline components in '{path}': {type(e).__name__}: {e}".rstrip(".") + ".",
                         f"Check that the folder is a complete diffusers {what} pipeline (re-copy it).") from None


def clip_tokenizer(merges: int = 160) -> Tokenizer:
    """A byte-level BPE in CLIP's layout: `<|startoftext|> ... <|endoftext|>`, padded with EOS.

    Merges are learned from the corpus by `_learn_bpe` (deterministic, unlike the `tokenizers` trainer,
    whose ties fall differently from run to run). The special tokens take the two highest ids, as in
    CLIP, so the pooled-output position (the EOS) is also the argmax of the ids."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = [w for text in _CORPUS for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text))]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    learned = _learn_bpe(words, merges)
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in learned]
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=learned, end_of_word_suffix="</w>"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.ByteLevel()
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    return Tokenizer(tok, eos, "<|endoftext|>")


def _learn_bpe(words: list[str], n_merges: int, end_of_word: str = "</w>") -> list[tuple[str, str]]:
    """Classic BPE: repeatedly merge the most frequent adjacent pair (ties: the larger pair string)."""
    from collections import Counter

    seqs = [list(w[:-1]) + [w[-1] + end_of_word] for w in words]
    merges = []
    for _ in range(n_merges):
        pairs = Counter(p for s in seqs for p in zip(s, s[1:]))
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == best:
                    s[i:i + 2] = [s[i] + s[i + 1]]
                i += 1
    return merges


def t5_tokenizer() -> Tokenizer:
    """A unigram (SentencePiece-style) tokenizer in T5's layout: `... </s>`, <pad> = 0, </s> = 1, <unk> = 2.

    Pieces: each corpus word with its `▁` prefix (score -1) and each character (score -2), so known words
    stay whole and others split into characters; unseen characters become <unk>."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    words = sorted({w.strip(".,:") for text in _CORPUS for w in text.split()} - {""})
    chars = sorted({c for text in _CORPUS for c in text if not c.isspace()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in words] + [(c, -2.0) for c in chars]
    tok = HFTokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return Tokenizer(tok, 0, "<pad>")


# ---- FLUX.2 ---------------------------------------------------------------------------------------------------
def flux2_text_layers(depth: int) -> tuple[int, int, int]:
    """Which hidden states make FLUX.2's prompt embeddings: Flux2Pipeline's text_encoder_out_layers (10, 20, 30)
    for Mistral Small's 40 layers; other depths (tiny encoders) at the same quarters, since a diffusers folder
    carries no such setting."""
    return depth // 4, depth // 2, 3 * depth // 4


# Mistral Small 3.1's language model (FLUX.2-dev's text encoder); the vision tower is never run for text-to-image,
# so the random one is minimal.
_MISTRAL_SMALL = dict(vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                      rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None)
_PIXTRAL_MINIMAL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                        head_dim=32, image_size=64, patch_size=16)
_FLUX2_VAE = dict(block_out_channels=[128, 256, 512, 512], latent_channels=32)

# name -> (Mistral text config, VAE config); tiny: 4 layers, of which 3 hidden states make 3 x 32 = 96 =
# tiny-flux2's joint_attention_dim, and a 4-level VAE (8x) as the real one
_RANDOM_FLUX2 = {
    "flux2": (_MISTRAL_SMALL, _FLUX2_VAE),
    "tiny": (dict(_MISTRAL_SMALL, vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024),
             dict(block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8, sample_size=128,
                  latent_channels=32)),
}

# Mistral's chat layout as its template renders a system and a user turn (Flux2Pipeline's format_input)
_MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set text = m['content'] if m['content'] is string else m['content'] | map(attribute='text') | join('') %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]{% endif %}{% endfor %}")


@dataclasses.dataclass
class Flux2Components:
    text_encoder: torch.nn.Module  # transformers Mistral3ForConditionalGeneration, eval
    tokenizer: object  # transformers PreTrainedTokenizerFast with Mistral's chat template
    vae: torch.nn.Module  # diffusers AutoencoderKLFlux2, eval

    @property
    def text_layers(self) -> tuple[int, int, int]:
        return flux2_text_layers(self.text_encoder.config.text_config.num_hidden_layers)

    @property
    def encoders(self) -> dict[str, torch.nn.Module]:
        return {"mistral": self.text_encoder}

    def prompt_tokenizers(self, text_tokens: int) -> dict[str, dict]:
        """The Mistral tokenizer as Flux2Pipeline uses it: the chat template rendered around the prompt (split at
        the prompt, so the runtime needs no template engine), tokenized without added specials, truncated and
        padded to the text length on the tokenizer's own side, with an attention mask."""
        from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input

        marker = "\x00PROMPT\x00"
        rendered = self.tokenizer.apply_chat_template(format_input([marker], SYSTEM_MESSAGE)[0], tokenize=False,
                                                      add_generation_prompt=False)
        prefix, suffix = rendered.split(marker)
        tok = Tokenizer(self.tokenizer.backend_tokenizer, self.tokenizer.pad_token_id, self.tokenizer.pad_token)
        return {"mistral": _spec(tok, text_tokens, template=[prefix, suffix], padding_side=self.tokenizer.padding_side,
                                 truncation_side=self.tokenizer.truncation_side, strip=["[IMG]"])}


def _random_flux2_components(name: str, dtype, device, seed: int) -> Flux2Components:
    from diffusers import AutoencoderKLFlux2
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    text_cfg, vae_cfg = _RANDOM_FLUX2[name]
    tokenizer = mistral_tokenizer()
    assert len(tokenizer) <= text_cfg["vocab_size"]
    cuda = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.device(device), torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed + 1)
        config = Mistral3Config(text_config=MistralConfig(**text_cfg),
                                vision_config=PixtralVisionConfig(**_PIXTRAL_MINIMAL))
        text_encoder = Mistral3ForConditionalGeneration(config)
        vae = AutoencoderKLFlux2(**vae_cfg)
        bn = vae.bn  # latent statistics as a trained VAE has them, not the identity
        bn.running_mean.copy_(torch.randn(bn.num_features) * 0.5)
        bn.running_var.copy_(torch.rand(bn.num_features) * 2 + 0.25)
    return Flux2Components(text_encoder.to(dtype).eval(), tokenizer, torch.nn.Module.to(vae, dtype).eval())


def _diffusers_flux2_components(path: str, dtype, device) -> Flux2Components:
    from diffusers import AutoencoderKLFlux2
    from transformers import AutoTokenizer, Mistral3ForConditionalGeneration

    def load(folder, dtype_kwargs):
        return (Mistral3ForConditionalGeneration.from_pretrained(folder("text_encoder"), **dtype_kwargs),
                AutoencoderKLFlux2.from_pretrained(folder("vae"), **dtype_kwargs),
                AutoTokenizer.from_pretrained(folder("tokenizer"), use_fast=True))

    text_encoder, vae, tokenizer = _from_folder(path, "FLUX.2", ["tokenizer", "text_encoder", "vae"], load, dtype)
    _check_vae_scale(vae, path)
    if not getattr(tokenizer, "chat_template", None):
        raise FluxcError(f"The tokenizer in '{path}/tokenizer' has no chat template; FLUX.2 prompts are chat-formatted.",
                         "Re-copy the tokenizer folder with its chat_template.")
    return Flux2Components(text_encoder.to(device).eval(), tokenizer, vae.to(device).eval())


def mistral_tokenizer(merges: int = 300):
    """A byte-level BPE with Mistral's special tokens (<unk> 0, <s> 1, </s> 2, [INST], [/INST], [SYSTEM_PROMPT],
    [/SYSTEM_PROMPT], <pad> 11) and chat template, as a transformers tokenizer (Flux2Pipeline's reference path
    calls apply_chat_template on it). Pads on the left, so the runtime's side handling is exercised. Merges are
    learned on the corpus and Flux2Pipeline's system message, which then takes about 30 tokens."""
    from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
                "[IMG_BREAK]", "[IMG_END]", "[AVAILABLE_TOOLS]", "<pad>"]
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = [w for text in _CORPUS + [SYSTEM_MESSAGE] for w, _ in pre.pre_tokenize_str(text)]
    learned = _learn_bpe(words, merges, end_of_word="")
    tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["".join(m) for m in learned]
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=learned, unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre, decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left", chat_template=_MISTRAL_CHAT_TEMPLATE,
                                   model_max_length=1024)


def save_pipeline_folder(path: str, transformer: torch.nn.Module, comps) -> None:
    """Write a diffusers FLUX (or FLUX.2) pipeline folder (safetensors) from these parts: a source for builds and
    tests."""
    diffusers_pipeline(transformer, comps).save_pretrained(path, safe_serialization=True)


def flux2_scheduler():
    """FlowMatchEulerDiscreteScheduler with dynamic exponential shifting (mu per image size and steps, computed
    by Flux2Pipeline). FLUX.2-dev's own scheduler config could not be read here to confirm it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")


def diffusers_pipeline(transformer: torch.nn.Module, comps=None):
    """diffusers' FluxPipeline (Flux2Pipeline for FLUX.2 components) over these parts, with FLUX.1-dev's
    scheduler config: the reference path. Without components (FLUX.1) it runs from prompt embeddings to
    latents only."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, FluxPipeline
    from transformers import PreTrainedTokenizerFast

    if isinstance(comps, Flux2Components):
        return Flux2Pipeline(scheduler=flux2_scheduler(), vae=comps.vae, text_encoder=comps.text_encoder,
                             tokenizer=comps.tokenizer, transformer=transformer)

    def hf(tok: Tokenizer, max_length: int, **specials):
        return PreTrainedTokenizerFast(tokenizer_object=tok.tokenizer, model_max_length=max_length,
                                       pad_token=tok.pad_token, **specials)

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    if comps is None:
        return FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=transformer)
    return FluxPipeline(
        scheduler=scheduler, vae=comps.vae, text_encoder=comps.clip, text_encoder_2=comps.t5, transformer=transformer,
        tokenizer=hf(comps.clip_tokenizer, CLIP_MAX_LENGTH, bos_token="<|startoftext|>", eos_token="<|endoftext|>"),
        tokenizer_2=hf(comps.t5_tokenizer, 512, eos_token="</s>", unk_token="<unk>"))
