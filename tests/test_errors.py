"""Every user-facing error: one paragraph with a remedy, exit code 1, no traceback."""

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from fluxc.cli import main
from fluxc.runtime.bundle import MANIFEST


def fluxc(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def assert_user_error(args, *fragments):
    code, out = fluxc(*args)
    assert code == 1, out
    assert "Traceback" not in out and "remedy:" in out and "FAILED |" in out.splitlines()[-1], out
    for f in fragments:
        assert f in out, out


def test_missing_model_path(tmp_path):
    assert_user_error(["build", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "e.fluxe")],
                      "not a known architecture")


def test_unknown_architecture(tmp_path):
    assert_user_error(["build", "--model", "flux9-ultra", "-o", str(tmp_path / "e.fluxe")], "flux1-dev")


def test_unreadable_model_path(tmp_path):
    bogus = tmp_path / "model.bin"
    bogus.write_bytes(b"\x80\x04pickle")
    assert_user_error(["build", "--model", str(bogus), "-o", str(tmp_path / "e.fluxe")], "neither a diffusers folder")


def test_corrupt_single_file_checkpoint(tmp_path):
    bad = tmp_path / "flux1-dev.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert_user_error(["build", "--model", str(bad), "--transformer-only", "-o", str(tmp_path / "e.fluxe")], "not a readable safetensors")
    assert not list(tmp_path.glob("*.fluxe*")) and not list(tmp_path.glob(".e.fluxe*"))


def test_corrupt_diffusers_shard(tmp_path, tiny_fp32):
    folder = tmp_path / "pipe" / "transformer"
    tiny_fp32.module.save_pretrained(str(folder))
    shard = next(folder.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated download
    assert_user_error(["build", "--model", str(tmp_path / "pipe"), "-o", str(tmp_path / "e.fluxe")],
                      "Cannot load the transformer weights")
    assert not list(tmp_path.glob("*.fluxe*")) and not list(tmp_path.glob(".e.fluxe*"))


@pytest.mark.parametrize("res", ["1000x1024", "1024x0", "big"])
def test_bad_resolution(tmp_path, res):
    assert_user_error(["build", "--model", "tiny", "--resolution", res, "-o", str(tmp_path / "e.fluxe")],
                      "1024" if res != "big" else "HEIGHTxWIDTH")


def test_foreign_target_and_plan_arguments(tmp_path):
    if not torch.cuda.is_available():
        assert_user_error(["build", "--model", "tiny", "--target", "sm_100", "--precision", "nvfp4",
                           "-o", str(tmp_path / "e")], "--stage plan")
    assert_user_error(["build", "--model", "tiny", "--target", "sm_80", "--precision", "nvfp4", "--stage", "plan",
                       "-o", str(tmp_path / "p")], "sm_89")
    assert_user_error(["build", "-o", str(tmp_path / "e")], "exactly one of --model")
    assert_user_error(["build", "--model", "tiny", "--from", str(tmp_path), "-o", str(tmp_path / "e")], "exactly one")
    assert_user_error(["build", "--from", str(tmp_path), "-o", str(tmp_path / "e")], "is not a fluxc plan")
    assert not os.listdir(tmp_path)


def _edit_manifest(path, edit):
    with open(os.path.join(path, MANIFEST)) as f:
        m = json.load(f)
    edit(m)
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(m, f)


def test_engine_for_another_gpu_arch(engine_copy):
    _edit_manifest(engine_copy, lambda m: m["target"].update(sm="sm_100", device="NVIDIA B200"))
    assert_user_error(["run", engine_copy, "-o", engine_copy + ".out"], "built for sm_100", "--target")


def test_engine_for_another_torch_version(engine_copy):
    _edit_manifest(engine_copy, lambda m: m["backend"].update(torch="2.99.0"))
    assert_user_error(["run", engine_copy, "-o", engine_copy + ".out"], "torch 2.99.0")


def test_unknown_format_version(engine_copy):
    _edit_manifest(engine_copy, lambda m: m.update(format_version=99))
    assert_user_error(["inspect", engine_copy], "format version 99")


def test_tampered_weights(engine_copy):
    path = os.path.join(engine_copy, "weights.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0x01  # one bit of one weight
    open(path, "wb").write(bytes(data))
    assert_user_error(["run", engine_copy, "-o", engine_copy + ".out"], "weights.safetensors", "sha256")


def test_missing_segment_file(engine_copy):
    seg = next(p for p in os.listdir(os.path.join(engine_copy, "segments")))
    os.remove(os.path.join(engine_copy, "segments", seg, "artifact.bin"))
    assert_user_error(["run", engine_copy, "-o", engine_copy + ".out"], "missing", seg)


def test_not_an_engine(tmp_path):
    assert_user_error(["inspect", str(tmp_path / "none.fluxe")], "No engine")


def test_wrong_resolution_and_embeddings(tiny_engine_path, tmp_path):
    assert_user_error(["run", tiny_engine_path, "--height", "512", "--width", "512", "-o", str(tmp_path / "l")],
                      "144x112", "128x96")
    emb = tmp_path / "emb.safetensors"
    save_file({"prompt_embeds": torch.zeros(1, 5, 64), "pooled_prompt_embeds": torch.zeros(1, 32)}, str(emb))
    assert_user_error(["run", tiny_engine_path, "--embeddings", str(emb), "-o", str(tmp_path / "l")], "(1, 13, 64)")
    assert_user_error(["run", tiny_engine_path, "--steps", "0", "-o", str(tmp_path / "l")], "steps")


# ---- text to image -------------------------------------------------------------------------------------
def test_bad_prompts_through_the_api(tiny_pipeline_engine):
    from fluxc.runtime import FluxcError

    with pytest.raises(FluxcError, match="non-empty list"):
        tiny_pipeline_engine.generate([])
    with pytest.raises(FluxcError, match="must be a string; got int"):
        tiny_pipeline_engine.generate(["a cat", 7])
    with pytest.raises(FluxcError, match="13 text tokens, not 512"):
        tiny_pipeline_engine.generate("a cat", max_sequence_length=512)


def test_bad_sampling_through_the_cli(tiny_pipeline_engine_path, tmp_path):
    out = str(tmp_path / "x.png")
    run = ["run", tiny_pipeline_engine_path, "--prompt", "a cat", "-o", out]
    assert_user_error(run + ["--steps", "0"], "steps must be an integer of at least 1")
    assert_user_error(run + ["--guidance", "nan"], "guidance must be a finite number")
    assert_user_error(run + ["--height", "128", "--width", "96"], "no 128x96 profile", "built for 144x112")
    assert_user_error(run[:-1] + [str(tmp_path / "x.gif2")], "Cannot tell an image format")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert_user_error(["run", tiny_pipeline_engine_path, "--prompts", str(empty), "-o", out], "holds no prompts")
    assert not os.path.exists(out)


def test_prompt_for_a_transformer_only_engine(tiny_engine_path, tmp_path):
    assert_user_error(["run", tiny_engine_path, "--prompt", "a cat", "-o", str(tmp_path / "x.png")],
                      "--transformer-only", "--embeddings")


def test_pipeline_build_needs_a_pipeline_source(tmp_path):
    ckpt = tmp_path / "flux1-dev.safetensors"
    save_file({"x": torch.zeros(1)}, str(ckpt))
    assert_user_error(["build", "--model", str(ckpt), "-o", str(tmp_path / "e.fluxe")], "holds a transformer only",
                      "--transformer-only")
    if not torch.cuda.is_available():
        assert_user_error(["build", "--model", "tiny", "--encoders", "offload", "-o", str(tmp_path / "e.fluxe")],
                          "needs a GPU target")
