"""Every user-facing error: one paragraph with a remedy, exit code 1, no traceback."""

import importlib.util
import json
import os

import blake3
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from fluxc.cli import main
from fluxc.runtime.core.bundle import MANIFEST

from fuzz_engine import rehash


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
    """Edit the manifest as someone who also rewrites the engine digest in seal.json would (an unsigned engine)."""
    with open(os.path.join(path, MANIFEST)) as f:
        m = json.load(f)
    edit(m)
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(m, f)
    rehash(path, MANIFEST)


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
    assert_user_error(["run", engine_copy, "-o", engine_copy + ".safetensors"], "weights.safetensors", "digest")


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


def test_inspect_says_what_it_checked(engine_copy):
    code, out = fluxc("inspect", engine_copy)
    assert code == 0 and "not verified" in out
    code, out = fluxc("inspect", engine_copy, "--verify")
    assert code == 0 and "every digest verified" in out
    path = os.path.join(engine_copy, "weights.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0x01
    open(path, "wb").write(bytes(data))
    assert_user_error(["inspect", engine_copy, "--verify"], "weights.safetensors", "digest")


# ---- every other user-facing error, each triggered once ------------------------------------------------------
def test_run_argument_errors(tiny_engine_path, tiny_pipeline_engine_path, tmp_path):
    img, lat = str(tmp_path / "x.png"), str(tmp_path / "l.safetensors")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert_user_error(["run", tiny_pipeline_engine_path, "--prompt", "a", "--prompts", str(prompts), "-o", img],
                      "Both --prompt and --prompts")
    assert_user_error(["run", tiny_pipeline_engine_path, "--prompt", "a", "--embeddings", lat, "-o", img],
                      "--embeddings replaces the text encoders")
    assert_user_error(["run", tiny_pipeline_engine_path, "--prompt", "a", "--gpus", "0", "-o", img], "--gpus 0")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    assert_user_error(["run", tiny_pipeline_engine_path, "--prompts", str(latin), "-o", img], "Cannot read prompts")
    assert_user_error(["run", tiny_pipeline_engine_path, "--prompt", "a", "-o", str(tmp_path / "x.notanimage")],
                      "Cannot tell an image format")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    assert_user_error(["run", tiny_engine_path, "--embeddings", str(bad), "-o", lat], "Cannot read embeddings")
    save_file({"prompt_embeds": torch.zeros(1, 13, 64)}, str(tmp_path / "half.safetensors"))
    assert_user_error(["run", tiny_engine_path, "--embeddings", str(tmp_path / "half.safetensors"), "-o", lat],
                      "lacks ['pooled_prompt_embeds']")
    assert_user_error(["run", tiny_engine_path, "--cache", "fbcache", "--cache-schedule", "2,x", "-o", lat],
                      "--cache-schedule takes step numbers")
    assert not os.path.exists(img) and not os.path.exists(lat)


def test_build_option_errors(tmp_path):
    from fluxc.build import BuildOptions
    from fluxc.runtime import FluxcError
    from fluxc.validate import validate

    out = str(tmp_path / "e.fluxe")

    def refused(match, **kw):
        with pytest.raises(FluxcError, match=match):
            validate(BuildOptions(model="tiny", output=out, target="cpu", **kw))

    refused("Unknown stage 'half'", stage="half")
    refused("cannot be negative", precision="fp8", calibrate=-1)
    refused("Batch size 0", batch=0)
    refused(r"Unknown recipe fields \['speed'\]", recipe_overrides=(("speed", 11),))
    refused("Unknown backend 'xla'", backend="xla")
    refused("Unknown encoder placement 'disk'", encoders="disk")
    if torch.cuda.is_available():
        refused("context parallelism does not shard", recipe="sm90_fp8_attn", world_size=2, target="auto")
    else:
        with pytest.raises(FluxcError, match="context parallelism does not shard"):
            validate(BuildOptions(model="tiny", output=out, target="sm_90", recipe="sm90_fp8_attn", world_size=2,
                                  stage="plan"))
    if importlib.util.find_spec("tensorrt"):
        refused("not --target cpu", backend="tensorrt")
    assert not os.listdir(tmp_path)


def test_plan_errors(tiny_fp32, tmp_path):
    """A damaged plan, and a good one finished the wrong way."""
    plan = tmp_path / "p.fluxp"
    plan.mkdir()
    (plan / "plan.json").write_text("{broken")
    assert_user_error(["build", "--from", str(plan), "-o", str(tmp_path / "e")], "plan.json is unreadable")
    (plan / "plan.json").write_text(json.dumps({"format": "fluxc-plan", "format_version": 0}))
    assert_user_error(["build", "--from", str(plan), "-o", str(tmp_path / "e")], "has plan format 0")
    good = str(tmp_path / "good.fluxp")
    code, out = fluxc("build", "--model", "tiny", "--target", "cpu", "--transformer-only", "--resolution", "144x112",
                      "--text-tokens", "13", "--stage", "plan", "-o", good)
    assert code == 0, out
    assert_user_error(["build", "--from", good, "--stage", "plan", "-o", str(tmp_path / "e")], "Drop --stage")
    if not torch.cuda.is_available():
        assert_user_error(["build", "--from", good, "--target", "sm_90", "-o", str(tmp_path / "e")],
                          "Cannot finish a plan for sm_90 on this machine (cpu)")
        _edit_json(os.path.join(good, "plan.json"), lambda h: [s.update(device="cuda") for s in h["segments"]])
        assert_user_error(["build", "--from", good, "-o", str(tmp_path / "e")], "was traced on a cuda machine")
    assert not os.path.exists(tmp_path / "e")


def _edit_json(path, edit):
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def test_damaged_engines(engine_copy, tmp_path):
    os.makedirs(tmp_path / "empty.fluxe")
    assert_user_error(["inspect", str(tmp_path / "empty.fluxe")], "has no manifest.json")
    manifest = os.path.join(engine_copy, MANIFEST)
    data = open(manifest, "rb").read()
    open(os.path.join(engine_copy, "notes.txt"), "w").write("x")
    assert_user_error(["run", engine_copy, "-o", engine_copy + ".safetensors"], "does not list: notes.txt")
    os.remove(os.path.join(engine_copy, "notes.txt"))
    open(manifest, "wb").write(data[:-10])
    assert_user_error(["inspect", engine_copy], "does not match the engine digest")
    rehash(engine_copy, MANIFEST)
    assert_user_error(["inspect", engine_copy], "is not valid JSON")
    open(manifest, "wb").write(data)
    _edit_manifest(engine_copy, lambda m: m["model"].update(family="flux9"))
    assert_user_error(["run", engine_copy, "-o", engine_copy + ".safetensors"], "unknown model family 'flux9'")


def test_a_segment_artifact_that_does_not_load(engine_copy):
    """Damaged by someone who also updated its digest in the manifest: the loader's error, not a traceback."""
    seg = sorted(os.listdir(os.path.join(engine_copy, "segments")))[0]
    artifact = os.path.join(engine_copy, "segments", seg, "artifact.bin")
    open(artifact, "wb").write(b"\x00" * 64)
    digest = blake3.blake3(b"\x00" * 64).hexdigest()
    _edit_manifest(engine_copy, lambda m: m["files"].update({f"segments/{seg}/artifact.bin": digest}))
    assert_user_error(["run", engine_copy, "-o", engine_copy + ".safetensors"], "Cannot load compiled segment")


def test_engine_api_errors(tiny_pipeline_engine, tiny_pipeline_engine_path):
    from fluxc.runtime import Engine, FluxcError

    with pytest.raises(FluxcError, match="Unknown output_type 'jpeg'"):
        tiny_pipeline_engine.generate("a cat", steps=1, output_type="jpeg")
    with pytest.raises(FluxcError, match="Unknown encoder placement 'disk'"):
        Engine.load(tiny_pipeline_engine_path, verify=False, encoders="disk")
    with pytest.raises(FluxcError, match="compiled for the CPU"):
        Engine.load(tiny_pipeline_engine_path, verify=False, encoders="gpu")


def test_damaged_pipeline_components(tiny_pipeline_dir, tmp_path):
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline_dir, folder)
    vae = next((folder / "vae").glob("*.safetensors"))
    vae.write_bytes(vae.read_bytes()[:100])
    assert_user_error(["build", "--model", str(folder), "--target", "cpu", "--resolution", "144x112",
                       "--text-tokens", "13", "-o", str(tmp_path / "e.fluxe")], "Cannot load the pipeline components")
    assert not os.path.exists(tmp_path / "e.fluxe")


def test_a_weight_no_format_can_hold(tmp_path):
    """NaN in a weight an NVFP4 build quantizes: the build names the tensor."""
    import types

    from fluxc.passes import quantize_nvfp4
    from fluxc.passes.base import PassContext
    from fluxc.recipes import RECIPES
    from fluxc.runtime import FluxcError
    from fluxc.weights import engine_weights, one_linear_graph

    w, b = torch.randn(32, 64), torch.zeros(32)
    gm = quantize_nvfp4.run(one_linear_graph(w, b, 8, "proj"), PassContext(RECIPES["sm100_nvfp4"](), "cpu", "double")).graph
    seg = types.SimpleNamespace(graph=gm, kind="double", layers=["transformer_blocks.0"])
    w[3, 5] = float("nan")
    tensors = {"transformer_blocks.0.proj.weight": w, "transformer_blocks.0.proj.bias": b}
    with pytest.raises(FluxcError, match=r"Cannot make transformer_blocks\.0\.nvfp4"):
        engine_weights([seg], tensors)
