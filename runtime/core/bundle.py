"""The engine bundle on disk (`*.fluxe` directory): writing its weights, reading and verifying it.

    manifest.json          format version, model, target, precision, recipe, passes, backend, profiles,
                           segments, sha256 of every other file, build times, numerics, cache key
    weights.safetensors    transformed weights, diffusers pipeline-folder names (transformer at the top
                           level; text_encoder., text_encoder_2., vae. prefixes for the other components)
    segments/<name>/       one compiled artifact per segment and profile
    tokenizers/clip.json   the two tokenizers as tokenizer.json files for the `tokenizers` library
    tokenizers/t5.json     (absent in a transformer-only engine)
"""

import hashlib
import json
import os
import tempfile

import torch

from fluxc.runtime.core.errors import FluxcError

# The engine bundle format; the runtime refuses any other. 2: text encoders, VAE, tokenizers; 3: fused weights,
# single blocks over the joint text+image sequence; 4: cache points (manifest "cache", probe segments),
# profiles' world_size and the model family always recorded (no defaults for older manifests).
FORMAT_VERSION = 4

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
TOKENIZER_DIR = "tokenizers"
ENCODER_PLACEMENTS = ("gpu", "offload", "cpu")  # resident on the GPU | parked in CPU memory between prompts | run on the CPU


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# torch dtype -> safetensors dtype name (the format's spec; safetensors.torch reads them back)
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> str:
    """Write tensors (on any device) as one safetensors file, one tensor at a time, and return its sha256,
    computed on the way. safetensors.torch.save_file holds every tensor's bytes in host memory at once (twice,
    with the CPU copies): 128 GB for a bf16 FLUX.2-dev engine. Format: u64 little-endian header length, the
    JSON header (space-padded to 8 bytes), then each tensor's bytes in header order."""
    names = sorted(tensors)
    header, offset = {}, 0
    for name in names:
        t = tensors[name]
        if t.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: safetensors cannot hold {t.dtype}")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for block in _safetensors_blocks(text, (tensors[n] for n in names)):
            f.write(block)
            digest.update(block)
    return digest.hexdigest()


def _safetensors_blocks(header: bytes, tensors):
    yield len(header).to_bytes(8, "little")
    yield header
    for t in tensors:
        yield memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def write_texts(root: str, files: dict[str, str]) -> None:
    """Write each text under root at its relative path (the tokenizer.json files of an engine or a plan)."""
    for rel, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "w") as f:
            f.write(text)


def bundle_files(root: str) -> list[str]:
    """Every file of a bundle except the manifest, as sorted relative paths."""
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MANIFEST:
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def read_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        raise FluxcError(f"No engine at '{root}'.", "Check the path, or build one with `fluxc build ... -o ENGINE`.")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise FluxcError(f"'{root}' has no {MANIFEST}; it is not a fluxc engine.",
                         "Point at a directory written by `fluxc build`.") from None
    except (OSError, json.JSONDecodeError) as e:
        raise FluxcError(f"Cannot read {path}: {e}.", "The engine is damaged: rebuild it.") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise FluxcError(
            f"Engine format version {version!r} is not supported by this fluxc (it reads version {FORMAT_VERSION}).",
            "Rebuild the engine with this fluxc, or use the fluxc version that built it "
            f"({manifest.get('fluxc_version', 'unknown')}).",
        )
    return manifest


def verify_files(root: str, manifest: dict) -> None:
    """Every listed file exists with its recorded sha256, and no file is unlisted."""
    recorded = manifest["files"]
    on_disk = set(bundle_files(root))
    missing = sorted(set(recorded) - on_disk)
    if missing:
        raise FluxcError(f"Engine file {missing[0]} is missing from '{root}'.", "Rebuild the engine or copy it again whole.")
    extra = sorted(on_disk - set(recorded))
    if extra:
        raise FluxcError(f"Engine '{root}' holds a file its manifest does not list: {extra[0]}.",
                         "Remove the file, or rebuild the engine.")
    for rel, digest in recorded.items():
        if sha256_file(os.path.join(root, rel)) != digest:
            raise FluxcError(f"Engine file {rel} does not match its sha256 in the manifest (changed or corrupt).",
                             "Rebuild the engine or copy it again whole; never edit engine files by hand.")


def check_writable(path: str) -> None:
    """FluxcError unless a file or directory can be created at `path` (checked before long work, so that it does not
    end in a traceback): its folder exists and takes a new file (tried: permission bits do not stop root, and
    read-only mounts like /proc refuse anyway)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FluxcError(f"Output folder '{parent}' does not exist.", "Create it, or choose another -o path.")
    ours = any(os.path.exists(os.path.join(path, name)) for name in (MANIFEST, "plan.json"))
    if os.path.isdir(path) and os.listdir(path) and not ours:
        raise FluxcError(f"'{path}' is a folder that holds no fluxc engine or plan; writing there would replace it.",
                         "Choose another -o path, or remove the folder.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fluxc-write-check-", dir=parent)
    except OSError as e:
        raise FluxcError(f"Cannot write to '{parent}': {e.strerror}.", "Choose an -o path in a folder you can write.") from None
    os.close(fd)
    os.remove(probe)


def save_atomically(path: str, save) -> None:
    """save(tmp) next to `path`, then rename it into place: a failure never leaves a half-written file under the
    name, and a reader sees the old file or the new one (the file's counterpart of fluxc.plan.atomic_directory).
    tmp keeps path's extension, for writers that read it."""
    tmp = f"{path}.partial{os.path.splitext(path)[1]}"
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
