"""Every user-facing error: one paragraph with a remedy, exit code 1, no traceback."""

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from fluxc.cli import main
from fluxc.runtime.core.bundle import MANIFEST


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
    assert_user_error(["run", engine_copy, "-o", engine_copy + ".safetensors"], "built for sm_100", "--target")


def test_engine_for_another_torch_version(engine_copy):
    _edit_manifest(engine_copy, lambda m: m["backend"].update(torch="2.99.0"))
    assert_user_error(["run", engine_copy, "-o", engine_copy + ".safetensors"], "torch 2.99.0")


def test_unknown_format_version(engine_copy):
    _edit_manifest(engine_copy, lambda m: m.update(format_version=99))
    assert_user_error(["inspect", engine_copy], "format version 99")


def test_tampered_weights(engine_copy):
    path = os.path.join(engine_copy, "weights.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0x01  # one bit of one weight
    open(path, "wb").write(bytes(data))
    assert_user_error(["run", engine_copy, "-o", engine_copy + ".safetensors"], "weights.safetensors", "sha256")


def test_missing_segment_file(engine_copy):
    seg = next(p for p in os.listdir(os.path.join(engine_copy, "segments")))
    os.remove(os.path.join(engine_copy, "segments", seg, "artifact.bin"))
    assert_user_error(["run", engine_copy, "-o", engine_copy + ".safetensors"], "missing", seg)


def test_not_an_engine(tmp_path):
    assert_user_error(["inspect", str(tmp_path / "none.fluxe")], "No engine")


def test_wrong_resolution_and_embeddings(tiny_engine_path, tmp_path):
    assert_user_error(["run", tiny_engine_path, "--height", "512", "--width", "512", "-o", str(tmp_path / "l.safetensors")],
                      "144x112", "128x96")
    emb = tmp_path / "emb.safetensors"
    save_file({"prompt_embeds": torch.zeros(1, 5, 64), "pooled_prompt_embeds": torch.zeros(1, 32)}, str(emb))
    assert_user_error(["run", tiny_engine_path, "--embeddings", str(emb), "-o", str(tmp_path / "l.safetensors")], "(1, 13, 64)")
    assert_user_error(["run", tiny_engine_path, "--steps", "0", "-o", str(tmp_path / "l.safetensors")], "steps")


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


# ---- found trying fluxc as a new user would (issue 26) ------------------------------------------------------
@pytest.mark.parametrize("sub", ["build", "run", "bench", "eval", "inspect", "passes", "compare", "doctor"])
def test_help_exits_0_without_a_status_line(sub):
    code, out = fluxc(sub, "--help")
    assert code == 0 and "Typical use:" in out
    assert "FAILED |" not in out and "PASSED |" not in out


def test_an_unwritable_output_is_refused_before_any_work(tiny_pipeline_engine_path, tiny_engine_path, tmp_path):
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    assert_user_error(["run", tiny_pipeline_engine_path, "--prompt", "a cat", "-o", str(not_a_folder / "a.png")],
                      "file.txt' does not exist")
    assert_user_error(["run", tiny_pipeline_engine_path, "--prompt", "a cat", "-o", "/proc/x.png"], "Cannot write to '/proc'")
    assert_user_error(["run", tiny_engine_path, "-o", "/proc/l.safetensors"], "Cannot write to '/proc'")
    assert_user_error(["build", "--model", "tiny", "--target", "cpu", "-o", "/proc/e.fluxe"], "Cannot write to '/proc'")
    assert_user_error(["bench", tiny_engine_path, "-o", "/proc/r.json"], "Cannot write to '/proc'")
    assert_user_error(["eval", tiny_engine_path, "--reference", tiny_engine_path, "-o", "/proc/r.json"],
                      "Cannot write to '/proc'")
    taken = tmp_path / "photos"
    taken.mkdir()
    (taken / "cat.jpg").write_bytes(b"")
    assert_user_error(["build", "--model", "tiny", "--target", "cpu", "-o", str(taken)], "holds no fluxc engine")
    assert sorted(os.listdir(taken)) == ["cat.jpg"]


def test_a_seed_out_of_range(tiny_engine_path, tiny_pipeline_engine, tmp_path):
    code, out = fluxc("run", tiny_engine_path, "--seed", "99999999999999999999", "-o", str(tmp_path / "l.safetensors"))
    assert code == 2 and "Traceback" not in out and "--seed" in out and not os.listdir(tmp_path)
    from fluxc.runtime import FluxcError

    with pytest.raises(FluxcError, match="seed must be an integer from 0"):
        tiny_pipeline_engine.generate("a cat", seed=2**70, steps=1)


def test_run_without_a_prompt_writes_latents_only_to_safetensors(tiny_pipeline_engine_path, tmp_path):
    assert_user_error(["run", tiny_pipeline_engine_path, "-o", str(tmp_path / "forgot.png")], "No --prompt", "--prompt")
    assert_user_error(["run", tiny_pipeline_engine_path, "--prompt", "a cat", "-o", str(tmp_path / "l.safetensors")],
                      "prompts make images")
    assert not os.listdir(tmp_path)


def test_a_size_that_is_no_multiple_of_16(tiny_pipeline_engine_path, tmp_path):
    assert_user_error(["run", tiny_pipeline_engine_path, "--prompt", "a cat", "--height", "150", "--width", "112",
                       "-o", str(tmp_path / "x.png")], "no 150x112 profile", "multiples of 16", "144x112")


def test_gpus_are_checked_against_the_engine_before_any_rank_starts(tiny_pipeline_engine_path, tmp_path):
    out = str(tmp_path / "x.png")
    code, text = fluxc("run", tiny_pipeline_engine_path, "--prompt", "a cat", "--gpus", "2", "-o", out)
    assert code == 1 and "built for 1 rank(s)" in text and "--gpus 2 was given" in text
    assert "Rank" not in text and len(text.splitlines()) <= 4  # no launcher output
    assert_user_error(["run", str(tmp_path / "none.fluxe"), "--prompt", "a cat", "--gpus", "2", "-o", out], "No engine")


def test_an_engine_of_the_previous_format_is_refused_with_the_rebuild_remedy(engine_copy):
    from fluxc.runtime.core.bundle import FORMAT_VERSION

    _edit_manifest(engine_copy, lambda m: m.update(format_version=FORMAT_VERSION - 1))
    assert_user_error(["run", engine_copy, "-o", engine_copy + ".safetensors"],
                      f"format version {FORMAT_VERSION - 1} is not supported", "Rebuild the engine")


def test_recipe_and_precision_that_disagree(tmp_path):
    assert_user_error(["build", "--model", "tiny", "--target", "cpu", "--recipe", "sm90_fp8", "--precision", "bf16",
                       "-o", str(tmp_path / "e.fluxe")], "Recipe 'sm90_fp8' is fp8, but --precision bf16 was given")
    assert_user_error(["build", "--model", "tiny", "--target", "cpu", "--precision", "fp7", "-o", str(tmp_path / "e")],
                      "Unknown precision 'fp7'")
    assert_user_error(["build", "--model", "tiny", "--target", "cpu", "--recipe", "sm90_fp9", "-o", str(tmp_path / "e")],
                      "Unknown recipe 'sm90_fp9'")
    assert_user_error(["passes", "--recipe", "sm90_fp9"], "Unknown recipe 'sm90_fp9'")
    assert_user_error(["passes", "--target", "sm_100x"], "Unknown target 'sm_100x'")
    assert_user_error(["build", "--model", "tiny", "--target", "hopper", "-o", str(tmp_path / "e")], "Unknown target")
    assert not os.listdir(tmp_path)


def test_a_model_larger_than_the_memory_is_refused_up_front(tmp_path):
    """flux2-dev (32B parameters, 64 GB in bf16) on the CPU target: refused before loading, not by the allocator."""
    from fluxc.frontend.models import weight_bytes
    from fluxc.validate import _available_host_memory

    need, free = weight_bytes("flux2-dev", torch.bfloat16), _available_host_memory()
    assert need == pytest.approx(64.4e9, rel=0.02)  # the published 32B
    if free is None or free >= need:
        pytest.skip(f"this machine has {free} bytes available: flux2-dev fits")
    assert_user_error(["build", "--model", "flux2-dev", "--target", "cpu", "--transformer-only",
                       "-o", str(tmp_path / "e.fluxe")], "needs at least 64.", "GB", "available")


def test_a_build_stopped_by_sigterm_leaves_nothing(tmp_path):
    """`timeout` stops a build with SIGTERM: the partial engine folder goes with it (SIGINT did so already)."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "e.fluxe"
    proc = subprocess.Popen([sys.executable, "-c", "from fluxc.cli import main; main()", "build", "--model", "tiny",
                             "--target", "cpu", "--transformer-only", "--resolution", "144x112", "--text-tokens", "13",
                             "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".e.fluxe.partial-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # until the compile stage has made its partial folder
    assert list(tmp_path.glob(".e.fluxe.partial-*")), proc.communicate()[0][-2000:]
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert not os.listdir(tmp_path)
