"""fluxc serve on the GPU: cold start (process start to /health/ready) and throughput under concurrent clients.

    Both stages build a signed FLUX.1-dev whole-pipeline engine (--precision, --batch) and serve it with
    --trusted-key; `--stage start,load` runs both on one build.
    --stage start   start `python -m fluxc.runtime.serve
                    ENGINE --trusted-key PUB` --repeats times with the engine's files in the page cache (a replica
                    restarting on its host) and once after evicting them (cold disk); each start is timed from
                    before the process is spawned to the first 200 of /health/ready (engine verified, signature
                    checked, loaded, every profile warmed up), then one request checks an image comes back and
                    SIGTERM must give exit 0.
    --stage load    serve it and send --requests requests of --steps steps each from 1, 4
                    and 16 concurrent clients (each client one request at a time): images/s, p50/p99 latency, the
                    batch sizes the server formed; then Engine.generate called directly in this process, one request
                    at a time, for the server's overhead at one client.

    --stage lora    LoRA adapters on the engine (issue 29): two random rank-64 adapters on every transformer linear
                    (written as .fluxa directly: the conversion from a published layout is not what is timed);
                    Engine.set_adapters times (first set, A -> B, two at once, removal), ms/step with an adapter
                    against without, then the server with --lora a=... --lora b=... answering requests that
                    alternate the two (swap count and seconds from its metrics).

Random weights (no checkpoints here), 1024x1024 unless --resolution says otherwise. Writes JSON to --out and prints a table last.
"""

import argparse
import base64
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from bench_load import evict, every_file, timed
from timing import source_commit
from fluxc.runtime.core.signing import generate
from fluxc.runtime.serve.ranks import free_port

PROMPT = "a photo of a red fox in the snow, golden hour"


# The lab's machines set PYTHONDONTWRITEBYTECODE=1 and ship torch without .pyc files, so every process there compiles
# the Python source of everything it imports: ~5 s of a server's start (scripts/profile_start.py). An installed
# image has its bytecode (pip compiles it at install); the server here may write it, so the first start (reported
# apart) writes it and the others read it.
SERVER_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def start_server(engine: str, port: int, *args: str):
    """(process, seconds from spawn to the first 200 of /health/ready)."""
    start = time.perf_counter()
    log = open(f"{engine}.server.log", "w")  # a pipe nobody reads would fill and block the server
    proc = subprocess.Popen([sys.executable, "-m", "fluxc.runtime.serve", engine, "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, text=True, env=SERVER_ENV)
    while True:
        if proc.poll() is not None:
            with open(f"{engine}.server.log") as f:
                raise RuntimeError(f"server exited {proc.returncode}: {f.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=1) as r:
                ready = json.load(r)
                return proc, time.perf_counter() - start, ready
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.02)


def stop_server(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=120)


def request(port: int, steps: int, seed: int) -> tuple[float, int]:
    """(seconds, image bytes) of one POST /v1/images/generations (the engine's first size)."""
    body = json.dumps({"prompt": PROMPT, "steps": steps, "seed": seed}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/images/generations", body,
                                 {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        data = json.load(r)
    return time.perf_counter() - start, len(base64.b64decode(data["data"][0]["b64_json"]))


def metric(port: int, name: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
        lines = r.read().decode().splitlines()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in lines if line.startswith(name)}


def stage_means(before: dict, after: dict) -> dict[str, float]:
    """Mean seconds of each stage of fluxc_stage_seconds (queue, encode, denoise, ... per batch or request) between
    two reads of /metrics."""
    out = {}
    for key, total in after.items():
        if key.startswith("fluxc_stage_seconds_sum"):
            count = key.replace("_sum", "_count")
            n = after[count] - before.get(count, 0)
            if n:
                out[key.split('"')[1]] = (total - before.get(key, 0)) / n
    return out


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def build_engine(args, r: dict) -> tuple[str, str]:
    """(engine, public key): the FLUX.1-dev whole-pipeline engine at 1024x1024, signed with a fresh key."""
    key = os.path.join(args.workdir, "release.key")
    generate(key)
    engine = os.path.join(args.workdir, f"{args.model}-{args.precision}-b{args.batch}.fluxe")
    h, w = (int(v) for v in args.resolution.split("x"))
    # built in a child process: what a build leaves in this one's GPU memory would crowd the servers (a bf16 engine
    # did not fit beside it on an 80 GB H100)
    command = [sys.executable, "-c", "from fluxc.cli import main; main()", "build", "--model", args.model,
               "--precision", args.precision, "--resolution", f"{h}x{w}", "--batch", str(args.batch),
               "--sign-key", key, "--target", "auto" if torch.cuda.is_available() else "cpu", "-o", engine]
    _, r["build_s"] = timed(lambda: subprocess.run(command, check=True, stdout=subprocess.DEVNULL))
    r["engine_bytes"] = sum(os.path.getsize(p) for p in every_file(engine))
    print(f"built {engine}: {r['engine_bytes'] / 1e9:.1f} GB in {r['build_s']:.0f} s", flush=True)
    return engine, key + ".pub"


def stage_start(args, r: dict, engine: str, public: str, save) -> None:
    starts = r["starts"] = []
    for i in range(args.repeats + 1):  # the first start after the build fills the segment caches: reported apart
        if i == args.repeats:
            evict(engine)
        port = free_port()
        proc, seconds, ready = start_server(engine, port, "--trusted-key", public)
        latency, png = request(port, 4, i)
        code = stop_server(proc)
        starts.append({"seconds": seconds, "server_startup": ready["startup_seconds"], "cold_disk": i == args.repeats,
                       "first_after_build": i == 0, "first_request_4_steps_s": latency, "png_bytes": png,
                       "exit_code": code})
        print(f"start {i}: {seconds:.2f} s to ready {ready['startup_seconds']}, exit {code}", flush=True)
        save()
    r["start_to_ready_warm_s"] = statistics.median(s["seconds"] for s in starts[1:-1]) if args.repeats > 1 else None
    r["start_to_ready_cold_disk_s"] = starts[-1]["seconds"]
    r["bar_s"] = 10.0 if args.precision == "fp8" else 15.0


def stage_load(args, r: dict, engine: str, public: str, save) -> None:
    port = free_port()
    proc, r["start_to_ready_s"], _ = start_server(engine, port, "--trusted-key", public)
    r["clients"] = {}
    seed = 0
    for clients in (1, 4, 16):
        n = max(args.requests, clients)
        before = metric(port, "fluxc_batch_images") | metric(port, "fluxc_stage_seconds")
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda s: request(port, args.steps, s), range(seed, seed + n)))
        wall = time.perf_counter() - start
        seed += n
        after = metric(port, "fluxc_batch_images") | metric(port, "fluxc_stage_seconds")
        calls = after["fluxc_batch_images_count"] - before["fluxc_batch_images_count"]
        lat = [x for x, _ in results]
        r["clients"][clients] = {"requests": n, "wall_s": wall, "images_per_s": n / wall,
                                 "p50_s": statistics.median(lat), "p99_s": percentile(lat, 0.99),
                                 "mean_s": statistics.mean(lat), "engine_calls": calls, "images_per_call": n / calls,
                                 "stage_mean_s": stage_means(before, after)}
        print(f"{clients} clients: {r['clients'][clients]}", flush=True)
        save()
    r["exit_code"] = stop_server(proc)
    from fluxc.runtime import Engine

    eng = Engine.load(engine)
    eng.generate("warm-up", steps=2)
    direct = [timed(lambda: eng.generate(PROMPT, steps=args.steps, seed=i))[1] for i in range(args.requests)]
    r["direct_mean_s"] = statistics.mean(direct)
    r["direct_p50_s"] = statistics.median(direct)
    r["overhead_one_client"] = r["clients"][1]["mean_s"] / r["direct_mean_s"] - 1


def random_adapter(linears: dict, path: str, seed: int, rank: int = 64) -> None:
    from fluxc.runtime.adapters import write_adapter

    g = torch.Generator().manual_seed(seed)
    factors = {m: ((torch.randn(rank, k, generator=g) / k ** 0.5).bfloat16(),
                   (torch.randn(n, rank, generator=g) * 0.02 / rank ** 0.5).bfloat16())
               for m, (n, k) in linears.items()}
    write_adapter(path, factors, {"family": "flux1", "source": {"file": "random", "seed": seed}, "ranks": [rank],
                                  "linears": len(factors)})


def stage_lora(args, r: dict, engine: str, public: str, save) -> None:
    from fluxc.runtime import Engine
    from fluxc.runtime.adapters import engine_linears

    eng = Engine.load(engine)
    linears = engine_linears(eng.manifest)
    paths = {name: os.path.join(args.workdir, f"{name}.fluxa") for name in ("a", "b")}
    for seed, (name, path) in enumerate(paths.items()):
        random_adapter(linears, path, seed)
    a, b = (eng.load_adapter(paths[n]) for n in ("a", "b"))
    out = {"linears": len(linears), "rank": 64, "adapter_file_bytes": os.path.getsize(paths["a"])}
    eng.generate("warm-up", steps=2)
    allocated = torch.cuda.memory_allocated if torch.cuda.is_available() else lambda: 0
    before = allocated()
    swaps = {"first_a": eng.set_adapters([(a, 1.0)])}
    out["base_copies_bytes"] = allocated() - before
    for i in range(3):
        swaps[f"a_to_b_{i}"] = eng.set_adapters([(b, 1.0)])
        swaps[f"b_to_a_{i}"] = eng.set_adapters([(a, 1.0)])
    swaps["two_at_once"] = eng.set_adapters([(a, 0.7), (b, 0.5)])
    swaps["remove"] = eng.set_adapters([])
    out["swaps"] = swaps
    out["swap_s_median"] = statistics.median(v["seconds"] for k, v in swaps.items() if k.startswith(("a_to", "b_to")))
    steps = {}
    for label, chosen in (("none", []), ("a", [(a, 1.0)]), ("none_again", [])):
        eng.set_adapters(chosen)
        ms = []
        eng.generate(PROMPT, steps=args.steps, seed=1, step_ms=ms)
        steps[label] = statistics.median(ms)
    out["ms_per_step"] = steps
    del eng
    torch.cuda.empty_cache()
    port = free_port()
    proc, out["server_start_s"], _ = start_server(engine, port, "--trusted-key", public, "--lora", f"a={paths['a']}",
                                                  "--lora", f"b={paths['b']}")
    latencies = []
    for i in range(args.requests * 2):
        body = {"prompt": PROMPT, "steps": args.steps, "seed": i, "lora": [{"name": "ab"[i % 2]}]}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/images/generations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as resp:
            json.load(resp)
        latencies.append(time.perf_counter() - start)
    m = metric(port, "fluxc_")
    out["served"] = {"requests": len(latencies), "latency_s": latencies, "mean_s": statistics.mean(latencies),
                     "swaps": m.get("fluxc_adapter_swaps_total"),
                     "swap_s_mean": m['fluxc_stage_seconds_sum{stage="adapters"}']
                     / m['fluxc_stage_seconds_count{stage="adapters"}']}
    out["served"]["exit_code"] = stop_server(proc)
    r["lora"] = out
    print(f"lora: {json.dumps(out)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", required=True, help="start, load, or start,load (both on one engine)")
    ap.add_argument("--model", default="flux1-dev", help="tiny: a smoke test of this script on the CPU")
    ap.add_argument("--resolution", default="1024x1024")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--requests", type=int, default=4, help="per concurrency level (at least one per client)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=".engines/serve")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    r = {"stage": args.stage, "precision": args.precision, "batch": args.batch, "steps": args.steps,
         "model": args.model, "resolution": args.resolution,
         "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "cpu_cores": os.cpu_count(),
         "torch": torch.__version__, "commit": source_commit()}
    stages = args.stage.split(",")

    def save():  # after each stage: a run cut short (device time spent) keeps what it measured
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1)

    engine, public = build_engine(args, r)
    save()
    for stage in stages:
        {"start": stage_start, "load": stage_load, "lora": stage_lora}[stage](args, r, engine, public, save)
        save()
    print(f"\n{args.stage}: {args.model} {args.precision} batch {args.batch} on {r['gpu']}, commit {r['commit']}")
    if "start" in stages:
        print(f"start to ready, page cache warm: {r['start_to_ready_warm_s']:.2f} s (bar {r['bar_s']:.0f} s); "
              f"cold disk: {r['start_to_ready_cold_disk_s']:.2f} s; first after build: {r['starts'][0]['seconds']:.2f} s")
    if "load" in stages:
        print(f"{'clients':>8}{'images/s':>10}{'p50 s':>8}{'p99 s':>8}{'img/call':>10}")
        for c, x in r["clients"].items():
            print(f"{c:>8}{x['images_per_s']:>10.3f}{x['p50_s']:>8.2f}{x['p99_s']:>8.2f}{x['images_per_call']:>10.2f}")
        print(f"direct Engine.generate mean {r['direct_mean_s']:.3f} s; server overhead at 1 client "
              f"{100 * r['overhead_one_client']:.2f}%")
    if "lora" in stages:
        x = r["lora"]
        print(f"lora rank 64 on {x['linears']} linears: swap median {x['swap_s_median']:.3f} s, first set "
              f"{x['swaps']['first_a']['seconds']:.3f} s, removal {x['swaps']['remove']['seconds']:.3f} s; ms/step "
              + ", ".join(f"{k} {v:.1f}" for k, v in x["ms_per_step"].items())
              + f"; served: {x['served']['requests']} alternating requests, mean {x['served']['mean_s']:.2f} s, "
              f"{x['served']['swaps']:.0f} swaps of {x['served']['swap_s_mean']:.3f} s")


if __name__ == "__main__":
    main()
