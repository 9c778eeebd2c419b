"""The CLI happy paths and the engine bundle's contract."""

import json
import os

import blake3
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from fluxc.cli import main
from fluxc.runtime.core.bundle import MANIFEST, SAFETENSORS_DTYPES, bundle_files, write_safetensors


def test_manifest_lists_every_file_with_its_hash(tiny_engine_path):
    m = json.load(open(os.path.join(tiny_engine_path, MANIFEST)))
    assert sorted(m["files"]) == bundle_files(tiny_engine_path)
    assert all(blake3.blake3(open(os.path.join(tiny_engine_path, f), "rb").read()).hexdigest() == h
               for f, h in m["files"].items())
    assert [p["name"] for p in m["profiles"]] == ["144x112", "128x96"]
    # 4 kinds and the TeaCache probe (insert_cache_points) x 2 profiles, and the 4 schedule segments
    # hoist_schedule split off (one each, for every profile)
    kinds = sorted((s["kind"], s["profile"]) for s in m["segments"])
    assert kinds == sorted([(k, p) for k in ("head", "double", "single", "tail", "double_probe")
                            for p in ("144x112", "128x96")]
                           + [(f"{k}_schedule", None) for k in ("head", "double", "single", "tail")])
    assert sum(f.endswith(".safetensors") for f in m["files"]) == 1
    assert m["target"]["sm"] == "cpu" and m["precision"] == "fp32" and len(m["cache_key"]) == 64
    assert all(v["max_relative_error"] <= 1e-4 for v in m["numerics"].values())


def test_streamed_weights_file_reads_back_through_safetensors(tmp_path):
    """The engine's own safetensors writer (one tensor at a time): the safetensors library reads every dtype,
    shape and value back, views and non-contiguous tensors as their values, and the digest is the file's."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    tensors = {f"t.{dtype}".replace("torch.", ""): (base * 4).to(dtype) for dtype in SAFETENSORS_DTYPES}
    tensors |= {"scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "transposed": base.t(), "row view": base[2]}
    path = str(tmp_path / "w.safetensors")
    digest = write_safetensors(path, tensors)
    assert digest == blake3.blake3(open(path, "rb").read()).hexdigest()
    bits = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # bit-exact, for every dtype
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(bits(got), bits(t)), name
    with pytest.raises(TypeError, match="complex64"):
        write_safetensors(str(tmp_path / "c.safetensors"), {"c": torch.zeros(2, dtype=torch.complex64)})


def test_engine_holds_only_the_rewritten_weights(tiny_engine_path):
    """fuse_qkv's concatenated weights replace the separate ones in the weight file; --explain's record."""
    m = json.load(open(os.path.join(tiny_engine_path, MANIFEST)))
    weights = load_file(os.path.join(tiny_engine_path, "weights.safetensors"))
    fused = "transformer_blocks.0.cat0(attn.to_q.weight,attn.to_k.weight,attn.to_v.weight)"
    assert weights[fused].shape == (768, 256) and "transformer_blocks.0.attn.to_q.weight" not in weights
    single = next(s for s in m["segments"] if s["kind"] == "single")
    assert {f"{layer}.{w}" for layer in single["layers"] for w in single["weights"]} <= set(weights)
    assert m["pass_explain"]["head-144x112"]["fuse_qkv"].endswith("no other linear reads its input view")


def test_run_writes_latents_and_inspect_reads_the_engine(tiny_engine_path, tmp_path):
    out = str(tmp_path / "lat.safetensors")
    result = CliRunner().invoke(main, ["run", tiny_engine_path, "--steps", "2", "-o", out])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].startswith("PASSED |")
    t = load_file(out)
    assert t["packed_latents"].shape == (1, 63, 64) and t["latents"].shape == (1, 16, 18, 14)
    assert torch.isfinite(t["latents"]).all()
    result = CliRunner().invoke(main, ["inspect", tiny_engine_path])
    assert result.exit_code == 0 and "double-144x112" in result.output and "x2" in result.output


def test_passes_command_prints_the_pipeline():
    result = CliRunner().invoke(main, ["passes", "--target", "cpu", "--precision", "fp32"])
    assert result.exit_code == 0
    assert "1. [canonicalize] functionalize_inplace" in result.output


def test_failed_build_leaves_nothing_and_keeps_the_old_engine(tiny_engine_path, tmp_path):
    """A build that fails after work started removes its partial bundle; an existing engine survives."""
    import shutil

    target = str(tmp_path / "e.fluxe")
    shutil.copytree(tiny_engine_path, target)
    before = sorted(os.listdir(target))
    bad = tmp_path / "ckpt.safetensors"
    from safetensors.torch import save_file

    save_file({"img_in.weight": torch.zeros(2, 2)}, str(bad))  # readable, but no FLUX model
    result = CliRunner().invoke(main, ["build", "--model", str(bad), "--transformer-only", "-o", target])
    assert result.exit_code == 1 and "lacks FLUX.1 tensors" in result.output
    assert sorted(os.listdir(target)) == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.safetensors", "e.fluxe"]


def test_builds_compile_in_a_cache_folder_keyed_on_the_ops_sources(tiny_engine_path, tmp_path, monkeypatch):
    """Unless TORCHINDUCTOR_CACHE_DIR names a folder of the user's, a build's Inductor entries go to
    $FLUXC_CACHE_DIR/build/<digest of fluxc.runtime.ops' sources>, so a fluxc whose ops changed only in launch options
    never reuses an older build's kernels; the user's folder is used as it is, and Inductor's default is not the
    user's (Inductor writes it into the variable itself). The build: the session's tiny engine."""
    import hashlib
    from pathlib import Path

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    import fluxc.runtime.ops
    from fluxc.backends.inductor import build_caches
    from fluxc.runtime.loaders import cache_folder

    user = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if user and os.path.abspath(user) != os.path.abspath(default_cache_dir()):
        pytest.skip("TORCHINDUCTOR_CACHE_DIR is set: builds in this session compiled there")
    ops = Path(fluxc.runtime.ops.__file__).parent
    expected = hashlib.sha256(b"".join(p.name.encode() + b"\0" + p.read_bytes() + b"\0"
                                       for p in sorted(ops.glob("*.py")))).hexdigest()[:16]
    assert any(Path(cache_folder("build", expected)).rglob("*.py")), "no Inductor output in the keyed folder"

    monkeypatch.setenv("FLUXC_CACHE_DIR", str(tmp_path))
    for chosen, keyed in ((str(tmp_path / "mine"), False), (default_cache_dir(), True)):
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", chosen)
        with build_caches():
            inside = os.environ["TORCHINDUCTOR_CACHE_DIR"]
        assert inside == (str(tmp_path / "build" / expected) if keyed else chosen)
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == chosen
