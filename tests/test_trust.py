"""Engine trust: digests over every file (the manifest included), Ed25519 signatures, the policy on unsigned
engines, no code from an untrusted engine, no traceback from a damaged one.

Independent references: the engine digest and file digests are recomputed here with the blake3 package over the
files' bytes, and signatures are checked with the cryptography package's Ed25519 directly, not through fluxc.
"""

import collections
import json
import os
import shutil
import subprocess
import sys

import blake3
import pytest
import torch
from cryptography.hazmat.primitives import serialization

from fluxc.runtime.core.signing import DOMAIN

from conftest import random_embeddings
from fuzz_engine import rehash
from test_errors import assert_user_error, fluxc

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    for name in ("alice", "bob"):
        code, out = fluxc("keygen", str(folder / name))
        assert code == 0, out
    return folder


@pytest.fixture
def pipeline_copy(tiny_pipeline_engine_path, tmp_path):
    dst = str(tmp_path / "pipeline.fluxe")
    shutil.copytree(tiny_pipeline_engine_path, dst)
    return dst


def _files(engine):
    return sorted(os.path.relpath(os.path.join(d, n), engine) for d, _, names in os.walk(engine) for n in names)


def test_keygen_writes_a_private_and_a_public_key(keys):
    assert oct(os.stat(keys / "alice").st_mode & 0o777) == "0o600"
    private = serialization.load_pem_private_key((keys / "alice").read_bytes(), password=None)
    public = serialization.load_pem_public_key((keys / "alice.pub").read_bytes())
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    assert private.public_key().public_bytes(*raw) == public.public_bytes(*raw)
    assert_user_error(["keygen", str(keys / "alice")], "never overwrites")


def test_the_seal_covers_the_manifest_which_covers_every_file(tiny_pipeline_engine_path):
    root = tiny_pipeline_engine_path
    manifest = open(os.path.join(root, "manifest.json"), "rb").read()
    seal = json.load(open(os.path.join(root, "seal.json")))
    assert seal["digest"] == blake3.blake3(manifest).hexdigest()
    listed = json.loads(manifest)["files"]
    assert sorted(listed) == [f for f in _files(root) if f not in ("manifest.json", "seal.json")]
    assert all(blake3.blake3(open(os.path.join(root, f), "rb").read()).hexdigest() == d for f, d in listed.items())


def test_sign_and_verify(pipeline_copy, keys):
    engine = pipeline_copy
    code, out = fluxc("verify", engine)
    assert code == 0 and "signature      none" in out, out
    assert_user_error(["verify", engine, "--trusted-key", str(keys / "alice.pub")], "is not signed")
    code, out = fluxc("sign", engine, "--key", str(keys / "alice"))
    assert code == 0, out

    # the signature, checked with cryptography directly over the digest recomputed here
    seal = json.load(open(os.path.join(engine, "seal.json")))
    digest = blake3.blake3(open(os.path.join(engine, "manifest.json"), "rb").read()).digest()
    alice = serialization.load_pem_public_key((keys / "alice.pub").read_bytes())
    entry, = seal["signatures"]
    assert entry["public_key"] == alice.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    alice.verify(bytes.fromhex(entry["signature"]), DOMAIN + digest)  # raises if invalid

    code, out = fluxc("verify", engine, "--trusted-key", str(keys / "alice.pub"))
    assert code == 0 and "trusted        signed by ed25519:" in out, out
    assert_user_error(["verify", engine, "--trusted-key", str(keys / "bob.pub")], "none of them a trusted key")

    for rel in _files(engine):  # any one-byte change anywhere fails, with the file named where a digest catches it
        path = os.path.join(engine, rel)
        data = open(path, "rb").read()
        at = len(data) // 2
        open(path, "wb").write(data[:at] + bytes([data[at] ^ 0x20]) + data[at + 1:])
        code, out = fluxc("verify", engine, "--trusted-key", str(keys / "alice.pub"))
        assert code == 1 and "Traceback" not in out and "remedy:" in out, (rel, out)
        if rel not in ("manifest.json", "seal.json"):
            assert f"{rel} does not match its digest" in out, (rel, out)
        open(path, "wb").write(data)
    code, out = fluxc("verify", engine, "--trusted-key", str(keys / "alice.pub"))
    assert code == 0, out


def test_build_signs_and_run_requires_a_trusted_key(tmp_path, keys):
    engine = str(tmp_path / "signed.fluxe")
    code, out = fluxc("build", "--model", "tiny", "--target", "cpu", "--transformer-only", "--resolution", "64x64",
                      "--text-tokens", "8", "--sign-key", str(keys / "bob"), "-o", engine)
    assert code == 0, out
    code, out = fluxc("verify", engine, "--trusted-key", str(keys / "bob.pub"))
    assert code == 0, out
    latents = str(tmp_path / "z.safetensors")
    assert_user_error(["run", engine, "--steps", "1", "--trusted-key", str(keys / "alice.pub"), "-o", latents],
                      "none of them a trusted key")
    code, out = fluxc("run", engine, "--steps", "1", "--trusted-key", str(keys / "bob.pub"), "-o", latents)
    assert code == 0 and os.path.exists(latents), out
    assert_user_error(["build", "--model", "tiny", "--target", "cpu", "--sign-key", str(keys / "alice.pub"),
                       "-o", str(tmp_path / "x.fluxe")], "not an unencrypted PEM private key")
    assert not os.path.exists(tmp_path / "x.fluxe")


def test_the_runtime_entry_takes_trusted_keys(tiny_pipeline_engine_path, keys, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fluxc.runtime", tiny_pipeline_engine_path, "--prompt", "a cat",
                           "--trusted-key", str(keys / "bob.pub"), "-o", str(tmp_path / "cat.png")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "is not signed" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "cat.png")


PLANT = r'''
import dataclasses, os, pickle, sys
from torch.utils._appending_byte_serializer import AppendingByteSerializer, BytesReader, BytesWriter
from torch.compiler._cache import CacheArtifactManager, _deserialize_single_cache, _serialize_single_cache

class Payload:
    def __reduce__(self):
        return (exec, (f"open({sys.argv[2]!r}, 'w').write('ran')",))

path = sys.argv[1]
reader = BytesReader(open(path, "rb").read())
header, torch_key, key, blob = reader.read_bytes(), reader.read_bytes(), reader.read_str(), reader.read_bytes()
CacheArtifactManager._ensure_cache_artifacts_registered()
groups = [(kind, [dataclasses.replace(a, content=pickle.dumps(Payload())) if kind == "aot_autograd" else a
                  for a in artifacts])
          for kind, artifacts in AppendingByteSerializer.to_list(blob, deserialize_fn=_deserialize_single_cache)]
serializer = AppendingByteSerializer(serialize_fn=_serialize_single_cache)
serializer.extend(groups)
writer = BytesWriter()
writer.write_bytes(header), writer.write_bytes(torch_key), writer.write_str(key), writer.write_bytes(serializer.to_bytes())
open(path, "wb").write(writer.to_bytes())
'''

LOAD = r'''
import json, sys
from fluxc.runtime import Engine, FluxcError
try:
    Engine.load(sys.argv[1], trusted_keys=sys.argv[2:] or None)
    result = "LOADED"
except FluxcError as e:
    result = f"REFUSED {e}"
print(json.dumps(result))
'''

RAW_LOAD = r'''
import sys, torch
try:
    torch._inductor.CompiledArtifact.load(path=sys.argv[1], format="binary")
except Exception as e:
    print(type(e).__name__)
'''


def _python(code, *args, env):
    """The last line of stdout of `code` run in a fresh interpreter (JSON where the code prints JSON)."""
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stdout, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if code is LOAD else (lines[-1] if lines else "")


def test_a_planted_pickle_never_runs_from_a_signed_load_or_from_another_engine(engine_copy, tiny_engine_path,
                                                                                keys, tmp_path):
    """A payload that writes a marker, planted in one artifact's AOTAutograd cache entry (every digest fixed as a
    tamperer would). With a trusted key it is refused before the marker appears; loaded unsigned it is refused too
    (its segment does not load; whether the payload ran first is not a claim: unsigned engines are trusted as local
    builds), and afterwards a clean engine with the same segments loads without the marker, with the same shared
    Inductor cache set. The control: torch's own loader runs the payload."""
    marker, shared = tmp_path / "marker", tmp_path / "shared-inductor-cache"
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(shared))
    code, out = fluxc("sign", engine_copy, "--key", str(keys / "alice"))
    assert code == 0, out
    rel = sorted(f for f in _files(engine_copy) if f.endswith("artifact.bin"))[0]
    _python(PLANT, os.path.join(engine_copy, rel), marker, env=env)
    rehash(engine_copy, rel)

    out = _python(LOAD, engine_copy, keys / "alice.pub", env=env)
    assert out.startswith("REFUSED") and "does not verify" in out, out
    assert not marker.exists()
    out = _python(LOAD, engine_copy, env=env)
    assert out.startswith("REFUSED") and "Cannot load compiled segment" in out, out
    assert marker.exists()

    marker.unlink()
    out = _python(LOAD, tiny_engine_path, env=env)
    assert out == "LOADED", out
    assert not marker.exists()
    out = _python(LOAD, tiny_engine_path, keys / "bob.pub", env=env)  # unsigned: refused before anything loads
    assert "is not signed" in out, out
    assert not marker.exists()

    # the control: the payload is live, run by torch's own loader (which copies it into the shared cache)
    _python(RAW_LOAD, os.path.join(engine_copy, rel), env=env)
    assert marker.exists()


@pytest.mark.parametrize("mode,cases", [("damage", 300), ("tamper", 300), ("signed", 150)])
def test_fuzzed_engines(pipeline_copy, keys, tmp_path, mode, cases):
    """Hundreds of one-byte mutations of every file (tests/fuzz_engine.py says how): never a traceback, a crash
    or a hang. Damaged or signed: a FluxcError or the same image. Tampered unsigned data files: also a different
    image where a weight's value changed, since nothing but a signature can tell a changed value from a built one."""
    args = ["--mode", mode, "--cases", str(cases), "--seed", str(cases)]
    if mode == "signed":
        assert fluxc("sign", pipeline_copy, "--key", str(keys / "alice"))[0] == 0
        args += ["--trusted-key", str(keys / "alice.pub")]
    out = tmp_path / "cases.jsonl"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "fuzz_engine.py"), pipeline_copy, str(out), *args],
                          capture_output=True, text=True, timeout=600)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert proc.returncode == 0 and len(records) == cases, proc.stderr[-3000:]  # no crash, every case finished
    bad = [r for r in records if r["outcome"] in ("traceback", "hang")]
    assert not bad, bad[:3]
    allowed = {"error", "same"} | ({"differs"} if mode == "tamper" else set())
    outcomes = collections.Counter(r["outcome"] for r in records)
    assert set(outcomes) <= allowed, outcomes
    differs = {r["file"] for r in records if r["outcome"] == "differs"}
    assert differs <= {"weights.safetensors"}, differs
    assert outcomes["error"] > cases // 2, outcomes
    print(mode, dict(outcomes))


def test_denoise_never_writes_into_its_inputs(tiny_engine):
    pe, pooled = random_embeddings()
    z = tiny_engine.family.initial_noise(1, tiny_engine.profile_for(144, 112), 64, 11, tiny_engine.dtype)
    before = (z.clone(), pe.clone(), pooled.clone())
    first = tiny_engine.denoise(pe, pooled, height=144, width=112, steps=2, latents=z)
    assert all(torch.equal(a, b) for a, b in zip((z, pe, pooled), before))
    second = tiny_engine.denoise(pe, pooled, height=144, width=112, steps=2, latents=z)
    assert torch.equal(first, second) and not torch.equal(first, z)


def test_a_vae_of_another_scale_is_refused(tmp_path):
    """diffusers' pipelines scale latents by 2 ** (len(block_out_channels) - 1); a 2-level VAE (scale 2) used to
    build and silently make images of the wrong size."""
    from diffusers import AutoencoderKL

    from fluxc.frontend.components import _check_vae_scale
    from fluxc.runtime import FluxcError

    small = AutoencoderKL(block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                          up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4, latent_channels=16)
    with pytest.raises(FluxcError, match="scales images by 2"):
        _check_vae_scale(small, str(tmp_path))
    flux = AutoencoderKL(block_out_channels=[8] * 4, down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=4, latent_channels=16)
    _check_vae_scale(flux, str(tmp_path))
