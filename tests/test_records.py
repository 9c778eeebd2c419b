"""fluxc bench, eval, compare and doctor: synthetic records across two GPU generations, tiny engines on CPU."""

import copy
import csv
import io
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fluxc.cli import main
from fluxc.numerics import ssim


def _bench(name, gpu, sm, precision, ms, steps=28, resolution="1024x1024", mode="native"):
    """A bench record as fluxc bench writes it, with made-up figures."""
    return {"kind": "bench", "version": 1, "name": name, "machine": {"gpu": gpu, "sm": sm},
            "software": {"torch": "2.11.0"}, "settings": {"resolution": resolution, "steps": steps, "batch": 1},
            "engine": {"precision": precision, "precision_mode": mode, "recipe": precision, "weights_gb": 12.0},
            "speed": {"ms_per_step": {"median": ms, "p10": ms * 0.98, "p90": ms * 1.03},
                      "e2e_s": {"total": ms * steps / 1000 + 0.1}, "peak_gpu_gib": 20.0}}


def _eval(bench, psnr, steps=28):
    rec = {k: copy.deepcopy(bench[k]) for k in ("name", "machine", "software", "engine")}
    return rec | {"kind": "eval", "settings": {"resolution": "1024x1024", "steps": steps, "prompts": 2, "seeds": 1},
                  "reference": {"name": "h200-bf16"},
                  "quality": {"mean": {"latent_sqnr_db": psnr - 10, "image_psnr_db": psnr, "ssim": 0.9}}}


RECORDS = [_bench("h200-bf16", "NVIDIA H200", "sm_90", "bf16", 124.0),
           _bench("h200-fp8", "NVIDIA H200", "sm_90", "fp8", 92.0),
           _bench("b200-nvfp4", "NVIDIA B200", "sm_100", "nvfp4", 41.0),
           _bench("h200-nvfp4", "NVIDIA H200", "sm_90", "nvfp4", 156.0, mode="emulated"),
           _bench("h200-fp8-20", "NVIDIA H200", "sm_90", "fp8", 92.5, steps=20)]


@pytest.fixture
def record_files(tmp_path):
    paths = []
    for i, rec in enumerate(RECORDS + [_eval(RECORDS[1], 38.0), _eval(RECORDS[2], 29.0, steps=20)]):
        paths.append(str(tmp_path / f"r{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(rec, f)
    return paths


def _compare(args):
    result = CliRunner().invoke(main, ["compare", *args])
    assert result.exit_code == 0, result.output
    return result.output.rsplit("\n", 2)[0]  # less the PASSED line


def test_compare_table_ratios_and_flags(record_files):
    rows = {r["name"] + "@" + r["gpu"]: r for r in json.loads(_compare(record_files + ["--format", "json"]))}
    assert len(rows) == 5
    base = RECORDS[0]["speed"]["ms_per_step"]["median"]
    for rec in RECORDS[:4]:  # same settings as the baseline: ratio = baseline ms / ms, across both GPUs
        row = rows[rec["name"] + "@" + rec["machine"]["gpu"]]
        assert row["ratio"] == pytest.approx(base / rec["speed"]["ms_per_step"]["median"])
    mismatch = rows["h200-fp8-20@NVIDIA H200"]
    assert "ratio" not in mismatch and mismatch["flags"] == ["not compared with h200-bf16: steps 20 vs 28"]
    assert rows["h200-fp8@NVIDIA H200"]["quality"]["image_psnr_db"] == 38.0  # eval merged into its bench row
    assert rows["b200-nvfp4@NVIDIA B200"]["flags"] == ["eval at steps 20 vs 28"]


def test_compare_formats_baseline_and_plot(record_files, tmp_path):
    md = _compare(record_files).splitlines()
    assert md[0].startswith("| name | gpu |") and len(md) == 2 + 5
    b200 = next(line for line in md if line.startswith("| b200-nvfp4 "))
    assert "| NVIDIA B200 |" in b200 and f"| {124.0 / 41.0:.2f} |" in b200
    assert "nvfp4*" in next(line for line in md if line.startswith("| h200-nvfp4 "))  # emulated
    table = list(csv.DictReader(io.StringIO(_compare(record_files + ["--format", "csv", "--baseline", "h200-fp8"]))))
    fp8 = next(r for r in table if r["name"] == "h200-fp8")
    bf16 = next(r for r in table if r["name"] == "h200-bf16")
    assert fp8["x baseline"] == "1.00" and bf16["x baseline"] == f"{92.0 / 124.0:.2f}"
    png = tmp_path / "chart.png"
    _compare(record_files + ["--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    (["--baseline", "nope"], "matches 0 bench records"),
    (["--baseline", "h200-fp8@NVIDIA B200"], "matches 0 bench records"),
])
def test_compare_errors(record_files, args, message):
    result = CliRunner().invoke(main, ["compare", *record_files, *args])
    assert result.exit_code == 1 and message in result.output


def test_compare_rejects_files_that_are_not_records(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    result = CliRunner().invoke(main, ["compare", str(bad)])
    assert result.exit_code == 1 and "not a fluxc bench or eval record" in result.output


def _ssim_direct(x, y, k=11, sigma=1.5):
    """SSIM written out per window position and channel (Wang et al. 2004), float64."""
    g = np.exp(-((np.arange(k) - k // 2) ** 2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2, out = 0.01**2, 0.03**2, []
    for c in range(x.shape[2]):
        for i in range(x.shape[0] - k + 1):
            for j in range(x.shape[1] - k + 1):
                a, b = x[i:i + k, j:j + k, c], y[i:i + k, j:j + k, c]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb, cov = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2, (w * a * b).sum() - ma * mb
                out.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(out))


def test_ssim_against_the_windowed_formula():
    rng = np.random.default_rng(0)
    x = rng.random((24, 20, 3))
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)
    assert ssim(x, y) == pytest.approx(_ssim_direct(x, y), abs=1e-12)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12) and ssim(x, y) < 0.95


@pytest.fixture(scope="module")
def tiny_bf16_pipeline_path(tmp_path_factory, tiny_pipeline_dir):
    from fluxc.build import BuildOptions, build

    path = str(tmp_path_factory.mktemp("engines") / "tiny-pipeline-bf16.fluxe")
    build(BuildOptions(model=tiny_pipeline_dir, output=path, target="cpu", precision="bf16", resolutions=((144, 112),),
                       text_tokens=13))
    return path


def test_eval_two_tiny_engines(tiny_bf16_pipeline_path, tiny_pipeline_engine_path, tmp_path):
    from fluxc.runtime import Engine

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", tiny_bf16_pipeline_path, "--reference", tiny_pipeline_engine_path,
                                       "--prompts", str(prompts), "--seeds", "2", "--steps", "3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rec = json.loads(out.read_text())
    assert rec["kind"] == "eval" and rec["engine"]["precision"] == "bf16" and rec["reference"]["engine"]["precision"] == "fp32"
    assert [(i["prompt"], i["seed"]) for i in rec["quality"]["items"]] == [
        ("a red cube", 0), ("a red cube", 1), ("a blue sphere", 0), ("a blue sphere", 1)]
    # the same images through Engine.generate, and PSNR written out here
    got, want = (Engine.load(p).generate("a blue sphere", seed=1, steps=3, output_type="np")[0]
                 for p in (tiny_bf16_pipeline_path, tiny_pipeline_engine_path))
    item = rec["quality"]["items"][3]
    mse = np.mean((got.astype(np.float64) - want.astype(np.float64)) ** 2)
    assert item["image_psnr_db"] == pytest.approx(10 * np.log10(1 / mse), rel=1e-9)
    assert item["ssim"] == pytest.approx(ssim(got, want), rel=1e-9) and 0 < item["ssim"] < 1
    assert np.isfinite(item["latent_sqnr_db"]) and item["latent_sqnr_db"] > 0
    assert rec["quality"]["mean"]["ssim"] == pytest.approx(np.mean([i["ssim"] for i in rec["quality"]["items"]]))


def test_bench_record_on_cpu(tiny_pipeline_engine_path, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", tiny_pipeline_engine_path, "--steps", "3", "--repeat", "2",
                                       "--warmup", "0", "--name", "tiny-cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rec = json.loads(out.read_text())
    ms = rec["speed"]["ms_per_step"]
    assert rec["name"] == "tiny-cpu" and rec["machine"]["sm"] == "cpu" and ms["samples"] == 3 * 2
    assert 0 < ms["p10"] <= ms["median"] <= ms["p90"]
    assert set(rec["speed"]["e2e_s"]) == {"encode", "denoise", "decode", "total"} and rec["speed"]["load_s"] > 0
    assert rec["engine"]["cache_key"] == json.load(open(f"{tiny_pipeline_engine_path}/manifest.json"))["cache_key"]
    bad = CliRunner().invoke(main, ["bench", tiny_pipeline_engine_path, "--repeat", "0", "-o", str(out)])
    assert bad.exit_code == 1 and "--repeat" in bad.output


def test_doctor_reports_precisions_and_tensorrt():
    from fluxc.doctor import precisions

    import importlib.util
    import re

    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 0 and "precision fp8" in result.output
    trt = "yes" if importlib.util.find_spec("tensorrt") else "no: --backend tensorrt is refused"
    assert re.search(rf"^TensorRT +{trt}", result.output, re.M)
    assert precisions("sm_80")["fp8"].startswith("no") and precisions("sm_90")["nvfp4"].startswith("emulated")
    assert precisions("sm_100")["nvfp4"] == "native"
    assert torch.cuda.is_available() or "CPU only" in result.output


def test_eval_against_eager_diffusers(tiny_pipeline_engine_path, tiny_pipeline_dir, tmp_path):
    """--reference eager: diffusers' FluxPipeline in bf16 from the engine's model source (here a diffusers folder).
    The first item's PSNR and SSIM against the same two images made here: diffusers' pipeline called directly
    (its own noise from a seeded generator) and the engine through Engine.generate."""
    from diffusers import FluxPipeline

    from fluxc.numerics import psnr_db
    from fluxc.records import DEFAULT_PROMPTS
    from fluxc.runtime import Engine

    out = tmp_path / "eager.json"
    result = CliRunner().invoke(main, ["eval", tiny_pipeline_engine_path, "--reference", "eager", "--steps", "3",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    rec = json.loads(out.read_text())
    assert rec["reference"]["name"] == "eager" and len(rec["quality"]["items"]) == 2
    pipe = FluxPipeline.from_pretrained(tiny_pipeline_dir, torch_dtype=torch.bfloat16)
    want = pipe(DEFAULT_PROMPTS[0], height=144, width=112, num_inference_steps=3, guidance_scale=3.5,
                max_sequence_length=13, generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
    got = Engine.load(tiny_pipeline_engine_path).generate(DEFAULT_PROMPTS[0], steps=3, seed=0, output_type="np")[0]
    item = rec["quality"]["items"][0]
    print(f"tiny fp32 engine vs bf16 FluxPipeline, 3 steps: {item['image_psnr_db']:.1f} dB, SSIM {item['ssim']:.3f}")
    assert item["image_psnr_db"] == pytest.approx(psnr_db(got, want), abs=0.05)
    assert item["ssim"] == pytest.approx(ssim(got, want), abs=1e-3)
    # fp32 against bf16: rounding noise (24.9 dB, SSIM 0.907 measured on the CPU), not another image
    assert item["image_psnr_db"] > 20 and item["ssim"] > 0.85


def test_compare_unreadable_and_unplottable_records(record_files, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    result = CliRunner().invoke(main, ["compare", str(broken)])
    assert result.exit_code == 1 and "Cannot read record" in result.output and "remedy:" in result.output
    evals = [p for p in record_files if json.load(open(p))["kind"] == "eval"]
    result = CliRunner().invoke(main, ["compare", *evals, "--plot", str(tmp_path / "c.png")])
    assert result.exit_code == 1 and "No bench records to plot" in result.output
    from fluxc.compare import load_records
    from fluxc.runtime.core.errors import FluxcError

    empty = tmp_path / "empty.json"
    empty.write_text("[]")  # a list of records, none in it
    with pytest.raises(FluxcError, match="No records given"):
        load_records([str(empty)])
