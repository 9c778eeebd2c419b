"""The engine bundle on disk (`*.fluxe` directory): writing its weights, reading and verifying it.

    manifest.json          format version, model, target, precision, recipe, passes, backend, profiles,
                           segments, the BLAKE3 digest of every other file, build times, numerics, cache key
    seal.json              the engine digest (BLAKE3 of manifest.json's bytes, so it covers every file) and the
                           Ed25519 signatures over it (fluxc.runtime.core.signing); written last
    weights.safetensors    transformed weights, diffusers pipeline-folder names (transformer at the top
                           level; text_encoder., text_encoder_2., vae. prefixes for the other components)
    segments/<name>/       one compiled artifact per segment and profile
    tokenizers/clip.json   the two tokenizers as tokenizer.json files for the `tokenizers` library
    tokenizers/t5.json     (absent in a transformer-only engine)
"""

import json
import os
import sys
import tempfile

import blake3
import torch

from fluxc.runtime.core.errors import FluxcError
from fluxc.runtime.core.schema import REBUILD, check_manifest

# The engine bundle format; the runtime refuses any other. 2: text encoders, VAE, tokenizers; 3: fused weights,
# single blocks over the joint text+image sequence; 4: cache points (manifest "cache", probe segments),
# profiles' world_size and the model family always recorded (no defaults for older manifests); 5: BLAKE3 file
# digests, seal.json (the manifest's digest and signatures), each segment's weight shapes and dtypes; 6: each
# segment's weight_sources (how its weights are made from the checkpoint: adapters and refits).
FORMAT_VERSION = 6

MANIFEST = "manifest.json"
SEAL = "seal.json"
WEIGHTS = "weights.safetensors"
TOKENIZER_DIR = "tokenizers"


def file_digest(path: str) -> str:
    """BLAKE3 of a file's bytes, hex: a tree hash, so one file is hashed on every core (memory-mapped; the GIL is
    released, so other threads go on meanwhile)."""
    return blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(path).hexdigest()


def bytes_digest(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


# torch dtype -> safetensors dtype name (the format's spec; safetensors.torch reads them back)
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> str:
    """Write tensors (on any device) as one safetensors file, one tensor at a time, and return its digest
    (file_digest's), computed on the way. safetensors.torch.save_file holds every tensor's bytes in host memory
    at once (twice, with the CPU copies): 128 GB for a bf16 FLUX.2-dev engine. Format: u64 little-endian header length, the
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
    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
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


def safetensors_ranges(path: str) -> dict[str, tuple[int, int]]:
    """Each tensor's [start, end) byte range in a safetensors file (the format: u64 header length, JSON header with
    data_offsets relative to the end of the header)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    base = 8 + size
    return {k: (base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__"}


def read_to_gpu(path: str, targets: list[tuple[str, torch.Tensor]], chunk: int = 64 << 20, slots: int = 4) -> None:
    """Fill each CUDA tensor of `targets` with the bytes of the safetensors tensor named with it (shapes and dtypes
    checked by the caller). The file is read in `chunk`-byte pieces by `slots` threads into pinned buffers (pread
    releases the GIL), each piece copied to the GPU asynchronously on a side stream: the page cache goes to the GPU
    at memory speed, where reading tensor by tensor into pageable memory and copying stalls at each step."""
    import collections
    from concurrent.futures import ThreadPoolExecutor

    ranges = safetensors_ranges(path)
    pieces = []
    for name, dest in targets:
        start, end = ranges[name]
        flat = dest.view(-1).view(torch.uint8)
        pieces += [(start + i, min(chunk, end - start - i), flat[i:i + chunk]) for i in range(0, end - start, chunk)]
    if not pieces:
        return
    buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
    copied = [None] * slots  # the event of each buffer's last copy to the GPU
    stream = torch.cuda.Stream(targets[0][1].device)
    fd = os.open(path, os.O_RDONLY)

    def read(slot: int, offset: int, n: int) -> None:
        view, done = memoryview(buffers[slot].numpy())[:n], 0
        while done < n:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise OSError(f"{path} ended before byte {offset + n}")
            done += got

    def issue(future, slot: int, n: int, dest: torch.Tensor) -> None:
        future.result()
        with torch.cuda.stream(stream):
            dest.copy_(buffers[slot][:n], non_blocking=True)
            copied[slot] = torch.cuda.Event()
            copied[slot].record(stream)

    # each piece passes the GIL between threads about four times; while another thread runs Python (Engine.load's
    # segments) every handoff waits out the interpreter's switch interval, 5 ms: on an H100 the FLUX.1-dev fp8 weights
    # (340 pieces) took 8-13 s so, against 2.2 s alone. A 0.1 ms interval while reading.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        with ThreadPoolExecutor(slots) as pool:
            queued = collections.deque()
            for k, (offset, n, dest) in enumerate(pieces):
                slot = k % slots
                if len(queued) == slots:  # the piece that used this slot before: on its way to the GPU first
                    issue(*queued.popleft())
                if copied[slot] is not None:
                    copied[slot].synchronize()
                queued.append((pool.submit(read, slot, offset, n), slot, n, dest))
            while queued:
                issue(*queued.popleft())
        stream.synchronize()
    finally:
        sys.setswitchinterval(interval)
        os.close(fd)


def write_texts(root: str, files: dict[str, str]) -> None:
    """Write each text under root at its relative path (the tokenizer.json files of an engine or a plan)."""
    for rel, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "w") as f:
            f.write(text)


def bundle_files(root: str) -> list[str]:
    """Every file of a bundle except the manifest and the seal, as sorted relative paths."""
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel not in (MANIFEST, SEAL):
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def read_manifest(root: str, trusted_keys=None) -> dict:
    """The engine's manifest, after checking manifest.json's bytes against the seal's digest, then (with
    trusted_keys, raw or PEM paths) a trusted signature over that digest before anything is parsed, then the
    format version and the whole structure (fluxc.runtime.core.schema). FluxcError on any failure."""
    if not os.path.isdir(root):
        raise FluxcError(f"No engine at '{root}'.", "Check the path, or build one with `fluxc build ... -o ENGINE`.")
    raw = _read(root, MANIFEST)
    digest, signatures = read_seal(root)
    if bytes_digest(raw) != digest:
        raise FluxcError(f"{MANIFEST} of '{root}' does not match the engine digest in {SEAL} (changed or corrupt).",
                         REBUILD)
    if trusted_keys is not None:
        from fluxc.runtime.core.signing import check_trusted, public_keys

        check_trusted(digest, signatures, public_keys(trusted_keys), root)
    manifest = _parse(raw, os.path.join(root, MANIFEST))
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise FluxcError(
            f"Engine format version {version!r} is not supported by this fluxc (it reads version {FORMAT_VERSION}).",
            "Rebuild the engine with this fluxc, or use the fluxc version that built it "
            f"({manifest.get('fluxc_version', 'unknown')}).",
        )
    check_manifest(manifest)
    return manifest


def _read(root: str, name: str) -> bytes:
    path = os.path.join(root, name)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        if name == SEAL:
            raise FluxcError(f"'{root}' has no {SEAL}: it was built by a fluxc older than engine format "
                             f"{FORMAT_VERSION}, or the file was lost.", "Rebuild the engine with this fluxc.") from None
        raise FluxcError(f"'{root}' has no {name}; it is not a fluxc engine.",
                         "Point at a directory written by `fluxc build`.") from None
    except OSError as e:
        raise FluxcError(f"Cannot read {path}: {e.strerror}.", REBUILD) from None


def _parse(raw: bytes, path: str):
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FluxcError(f"{path} is not valid JSON ({type(e).__name__}: {e}).", REBUILD) from None


def read_seal(root: str) -> tuple[str, list[dict]]:
    """(the engine digest, its signatures) from seal.json, checked for shape (not for validity)."""
    seal = _parse(_read(root, SEAL), os.path.join(root, SEAL))
    ok = (isinstance(seal, dict) and isinstance(seal.get("digest"), str) and _is_hex(seal["digest"], 64)
          and isinstance(seal.get("signatures"), list)
          and all(isinstance(e, dict) and _is_hex(e.get("public_key"), 64) and _is_hex(e.get("signature"), 128)
                  for e in seal["signatures"]))
    if not ok:
        raise FluxcError(f"{SEAL} of '{root}' is damaged.", REBUILD)
    return seal["digest"], seal["signatures"]


def _is_hex(value, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and all(c in "0123456789abcdef" for c in value)


def write_seal(root: str, signatures: list[dict] = ()) -> str:
    """Write seal.json for the manifest now in `root` (atomically) and return the engine digest."""
    digest = bytes_digest(_read(root, MANIFEST))

    def save(tmp):
        with open(tmp, "w") as f:
            json.dump({"format": "fluxc-seal", "digest": digest, "signatures": list(signatures)}, f, indent=1)

    save_atomically(os.path.join(root, SEAL), save)
    return digest


def sign_engine(root: str, private_key) -> str:
    """Add private_key's signature over the engine digest to the seal (replacing an older one by the same key); the
    key's fingerprint. The caller has verified the engine: a signature vouches for what is there."""
    from fluxc.runtime.core.signing import fingerprint, sign

    digest, signatures = read_seal(root)
    entry = sign(digest, private_key)
    write_seal(root, [e for e in signatures if e["public_key"] != entry["public_key"]] + [entry])
    return fingerprint(bytes.fromhex(entry["public_key"]))


def verify_files(root: str, manifest: dict, skip: tuple[str, ...] = ()) -> None:
    """Every listed file exists with its recorded digest, and no file is unlisted; the files in `skip` are only
    checked for presence (the caller verifies them itself: Engine.load hashes the weights while it reads them)."""
    recorded = manifest["files"]
    on_disk = set(bundle_files(root))
    missing = sorted(set(recorded) - on_disk)
    if missing:
        raise FluxcError(f"Engine file {missing[0]} is missing from '{root}'.", REBUILD)
    extra = sorted(on_disk - set(recorded))
    if extra:
        raise FluxcError(f"Engine '{root}' holds a file its manifest does not list: {extra[0]}.",
                         "Remove the file, or rebuild the engine.")
    for rel in sorted(set(recorded) - set(skip)):
        verify_file(root, rel, recorded[rel])


def verify_file(root: str, rel: str, digest: str) -> None:
    path = os.path.join(root, rel)
    try:
        ok = file_digest(path) == digest
    except OSError as e:
        raise FluxcError(f"Cannot read engine file {rel}: {e}.", REBUILD) from None
    if not ok:
        raise FluxcError(f"Engine file {rel} does not match its digest in the manifest (changed or corrupt).", REBUILD)


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
