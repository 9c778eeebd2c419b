"""fluxc serve on the tiny whole-pipeline engine (batch 4, 144x112: OpenAI size "112x144"), each server a real
subprocess on a free loopback port, talked to through the official `openai` client or plain HTTP (httpx)."""

import base64
import io
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from fluxc.runtime.serve.ranks import free_port  # noqa: E402

SIZE = "112x144"  # OpenAI's WIDTHxHEIGHT of the 144x112 profile
KEY = "test-key-0123456789"
HERE = os.path.dirname(__file__)


class Server:
    """A server process; `url` once /health/ready answers 200."""

    def __init__(self, argv: list[str], port: int, env: dict | None = None, timeout: float = 300):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(argv, env=os.environ | (env or {}), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}:\n{''.join(self.log)}"
            assert time.monotonic() < deadline, "server not ready in time:\n" + "".join(self.log)
            try:
                if httpx.get(self.url + "/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)

    def wait_for(self, name: str, value: float, timeout: float = 60) -> None:
        """Poll /metrics until sample `name` reaches `value` (a batch finishing on a busy CPU takes what it takes)."""
        deadline = time.monotonic() + timeout
        while self.metrics()[name] < value:
            assert time.monotonic() < deadline, f"{name} did not reach {value} in {timeout} s"
            time.sleep(0.05)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, parsed by prometheus-client's own parser: 'name{label="v"}' -> value."""
        out = {}
        for family in text_string_to_metric_families(httpx.get(self.url + "/metrics").text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
        return out


def fluxc_serve(engine: str, *args: str, env: dict | None = None) -> Server:
    port = free_port()
    return Server([sys.executable, "-m", "fluxc.runtime.serve", engine, "--port", str(port), *args], port, env)


@pytest.fixture(scope="module")
def server(tiny_pipeline_b4_path):
    """The batch-4 engine behind an API key, at most 2 images per request."""
    s = fluxc_serve(tiny_pipeline_b4_path, "--api-key-env", "FLUXC_TEST_KEY", "--max-n", "2",
                    env={"FLUXC_TEST_KEY": KEY})
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def engine(tiny_pipeline_b4_path):
    from fluxc.runtime import Engine

    return Engine.load(tiny_pipeline_b4_path)


def png(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return np.asarray(image)


def post(server, body: dict | bytes, key: str = KEY) -> httpx.Response:
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    return httpx.post(server.url + "/v1/images/generations", timeout=60,
                      headers={"Authorization": f"Bearer {key}"} | kwargs.pop("headers", {}), **kwargs)


def test_openai_client_gets_the_image_engine_generate_makes(client, engine):
    """A non-square size, n=2 (seeds 7 and 8), fluxc's fields as extra_body."""
    result = client.images.generate(model="tiny-b4", prompt="a photo of a cat", n=2, size=SIZE,
                                    response_format="b64_json", extra_body={"steps": 3, "seed": 7, "guidance": 4.0})
    assert len(result.data) == 2
    for datum, seed in zip(result.data, (7, 8)):
        want = engine.generate("a photo of a cat", height=144, width=112, steps=3, seed=seed, guidance=4.0)[0]
        got = png(datum.b64_json)
        assert got.shape == (144, 112, 3)
        assert np.array_equal(got, np.asarray(want)), f"seed {seed}: max diff {np.abs(got - np.asarray(want)).max()}"
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-b4"] and models[0].sizes == [SIZE] and models[0].batch == 4


def test_api_key_is_required(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt="a cat", size=SIZE)
    assert httpx.post(server.url + "/v1/images/generations", json={"prompt": "a cat"}).status_code == 401
    assert httpx.get(server.url + "/health/live").status_code == 200  # probes need no key


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": "a cat", "size": "144x112"}, 400, "is not one of this engine's sizes: 112x144"),
    ({"prompt": "a cat", "n": 3}, 400, "n is 3; this server makes 1 to 2 images"),
    ({"prompt": "   "}, 400, "The prompt is empty"),
    ({"prompt": "a" * 4001}, 400, "The prompt has 4001 characters"),
    ({"prompt": "a cat", "steps": 0}, 400, "steps is 0"),
    ({"prompt": "a cat", "steps": 101}, 400, "steps is 101"),
    (b'{"prompt": "a cat", "guidance": NaN}', 400, "guidance must be a finite number"),
    ({"prompt": "a cat", "cache": "teacache", "cache_threshold": -1}, 400, "cache threshold must be a finite number"),
    ({"prompt": "a cat", "response_format": "url"}, 400, "response_format 'url' is not served"),
    ({"prompt": "a cat", "model": "dall-e-3"}, 404, "'dall-e-3' does not exist"),
    ({"prompt": "a cat", "steps": "many"}, 422, "steps: Input should be a valid integer"),
    ({"prompt": "a cat", "style": "vivid"}, 422, "style: Extra inputs are not permitted"),
    ({"n": 1}, 422, "prompt: Field required"),
])
def test_bad_input_gets_its_status_and_one_paragraph(server, body, status, words):
    r = post(server, body)
    error = r.json()["error"]
    assert r.status_code == status and words in error["message"] and "\n" not in error["message"], r.text
    if status == 400 and "Remedy" not in error["message"]:
        pytest.fail(f"no remedy in {error['message']!r}")


def test_metrics_and_health(server, client):
    client.images.generate(prompt="a lighthouse", size=SIZE, extra_body={"steps": 2, "seed": 1})
    m = server.metrics()
    assert m["fluxc_ready"] == 1 and m["fluxc_queue_images"] == 0 and m["fluxc_requests_in_flight"] == 0
    assert m["fluxc_images_total"] >= 1 and m["fluxc_batch_images_count"] >= 1
    for stage in ("queue", "encode", "denoise", "decode", "png", "request"):
        assert m[f'fluxc_stage_seconds_count{{stage="{stage}"}}'] >= 1, stage
    errors = m.get('fluxc_errors_total{kind="invalid_value"}', 0)
    assert post(server, {"prompt": "a cat", "steps": 0}).status_code == 400
    assert server.metrics()['fluxc_errors_total{kind="invalid_value"}'] == errors + 1
    ready = httpx.get(server.url + "/health/ready").json()
    assert ready["status"] == "ready" and ready["startup_seconds"]["load"] > 0


def test_load_every_request_answered_and_batched(tiny_pipeline_b4_path):
    """64 concurrent clients, 5 requests each, a queue of 16 images: every request 200 or 429 (none lost, none
    hung: each client has a 60 s timeout), several batches larger than 1. Then SIGTERM under load."""
    s = fluxc_serve(tiny_pipeline_b4_path, "--max-queue", "16", "--batch-window-ms", "20")
    codes, latencies, retries = [], [], []

    def client(i):
        with httpx.Client(timeout=60) as c:
            for j in range(5):
                start = time.perf_counter()
                r = c.post(s.url + "/v1/images/generations",
                           json={"prompt": f"a lighthouse {j}", "size": SIZE, "steps": 2, "seed": 5 * i + j})
                codes.append(r.status_code)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                    assert len(r.json()["data"]) == 1
                else:
                    assert r.json()["error"]["code"] == "queue_full"
                    retries.append(int(r.headers["Retry-After"]))

    try:
        with ThreadPoolExecutor(64) as pool:
            list(pool.map(client, range(64)))
        m = s.metrics()
    except BaseException:
        s.stop()
        raise
    _sigterm_under_load(s)
    assert len(codes) == 320 and set(codes) <= {200, 429} and codes.count(200) >= 16
    assert m["fluxc_images_total"] == codes.count(200)
    assert m["fluxc_batch_images_sum"] == codes.count(200)  # every engine call's images went to a client
    assert m["fluxc_batch_images_count"] < codes.count(200)  # batches larger than 1 formed
    # Retry-After: whole seconds, at least 1, about one engine call (no call took longer than a whole request)
    assert retries and min(retries) >= 1 and max(retries) <= math.ceil(max(latencies))
    q = statistics.quantiles(latencies, n=100)
    print(f"\nload: {codes.count(200)} x 200, {codes.count(429)} x 429; {codes.count(200) / m['fluxc_batch_images_count']:.2f} "
          f"images per engine call; latency p50 {q[49] * 1e3:.0f} ms, p99 {q[98] * 1e3:.0f} ms")


def test_deadline_and_disconnect(tiny_pipeline_b4_path):
    """--timeout 0.5: a 100-step request (about 2 s here) gets 504 and a 2-step one 200; a client that hangs up
    while queued behind it is dropped (its image never made)."""
    s = fluxc_serve(tiny_pipeline_b4_path, "--timeout", "0.5", "--batch-window-ms", "0")
    try:
        r = httpx.post(s.url + "/v1/images/generations", json={"prompt": "slow", "size": SIZE, "steps": 100}, timeout=30)
        assert r.status_code == 504 and "limit of 0.5 s" in r.json()["error"]["message"]
        s.wait_for("fluxc_batch_images_count", 1)  # the discarded 100-step batch finishes
        calls = s.metrics()["fluxc_batch_images_count"]
        slow = threading.Thread(target=httpx.post, args=(s.url + "/v1/images/generations",),
                                kwargs={"json": {"prompt": "slow", "size": SIZE, "steps": 100}, "timeout": 30})
        slow.start()
        time.sleep(0.3)
        with pytest.raises(httpx.ReadTimeout):  # queued behind the slow one, then gone
            httpx.post(s.url + "/v1/images/generations", json={"prompt": "gone", "size": SIZE, "steps": 2}, timeout=0.2)
        slow.join()  # 504 after 0.5 s; its batch runs on
        s.wait_for("fluxc_batch_images_count", calls + 1)
        time.sleep(1.0)  # long enough for the 2-step request to have run, had it not been dropped
        m = s.metrics()
        assert m['fluxc_errors_total{kind="client_gone"}'] == 1 and m["fluxc_queue_images"] == 0
        assert m["fluxc_batch_images_count"] == calls + 1  # the slow one ran; the gone one never did
        assert httpx.post(s.url + "/v1/images/generations", json={"prompt": "ok", "size": SIZE, "steps": 2},
                          timeout=30).status_code == 200
    finally:
        assert s.stop() == 0


def _sigterm_under_load(s: Server):
    """SIGTERM with 8 requests in flight: all 8 answered 200, exit 0, and the port closed."""
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(httpx.post, s.url + "/v1/images/generations", timeout=30,
                               json={"prompt": f"p{i}", "size": SIZE, "steps": 50}) for i in range(8)]
        deadline = time.monotonic() + 10
        while s.metrics()["fluxc_requests_in_flight"] < 8:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        s.proc.send_signal(signal.SIGTERM)
        codes = [f.result().status_code for f in futures]
    assert codes == [200] * 8
    assert s.proc.wait(timeout=60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health/live")


def test_internal_error_answers_500_and_the_worker_goes_on(tiny_pipeline_b4_path):
    port = free_port()
    s = Server([sys.executable, os.path.join(HERE, "serve_fault.py"), tiny_pipeline_b4_path, str(port)], port)
    try:
        r = httpx.post(s.url + "/v1/images/generations", json={"prompt": "a fault", "size": SIZE, "steps": 2}, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert "RuntimeError" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/images/generations", json={"prompt": "a cat", "size": SIZE, "steps": 2}, timeout=30)
        assert r.status_code == 200
    finally:
        s.stop()  # plain uvicorn.run: it re-raises SIGTERM once stopped (fluxc serve's exit 0 is tested above)


def test_unsigned_engine_refused_with_a_trusted_key(tiny_pipeline_b4_path, tmp_path):
    from fluxc.runtime.core.signing import generate

    generate(str(tmp_path / "k"))
    r = subprocess.run([sys.executable, "-m", "fluxc.runtime.serve", tiny_pipeline_b4_path, "--port",
                        str(free_port()), "--trusted-key", str(tmp_path / "k.pub")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "error:" in r.stderr and "signed" in r.stderr, r.stderr


def test_playground_makes_an_image_in_chromium(server, engine, tmp_path):
    """The page at / in headless Chromium (Debian's chromium and chromium-driver, driven by Selenium): key typed,
    size list filled from /v1/models, Generate clicked; the image shown is Engine.generate's for its settings."""
    import shutil

    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip("no browser: needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    with webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path)) as page:
        page.get(server.url + "/")
        wait = WebDriverWait(page, 60)
        page.find_element(By.ID, "key").send_keys(KEY + "\t")  # change event: reload the model list with the key
        wait.until(lambda p: p.find_element(By.ID, "generate").is_enabled())
        assert page.find_element(By.ID, "size").get_attribute("value") == SIZE
        for field, value in (("steps", "3"), ("seed", "21")):
            page.find_element(By.ID, field).clear()
            page.find_element(By.ID, field).send_keys(value)
        page.find_element(By.ID, "generate").click()
        wait.until(lambda p: p.execute_script("const i = document.getElementById('image');"
                                              "return !i.hidden && i.complete && i.naturalWidth > 0;"))
        src = page.find_element(By.ID, "image").get_attribute("src")
        status = page.find_element(By.ID, "status").text
        prompt = page.find_element(By.ID, "prompt").get_attribute("value")
    assert src.startswith("data:image/png;base64,") and status.startswith("seed 21"), status
    want = engine.generate(prompt, height=144, width=112, steps=3, seed=21)[0]
    assert np.array_equal(png(src.split(",", 1)[1]), np.asarray(want))


def test_ray_serve_two_replicas_answer_the_openai_client(tiny_pipeline_b4_path, engine, tmp_path):
    """`serve run config.yaml`: the same app as a Ray Serve application with two replicas on the CPU; both
    replicas answer (two server processes behind Ray's proxy) and the official client gets Engine.generate's
    images through it."""
    import json
    import shutil

    pytest.importorskip("ray.serve")
    serve_cli = shutil.which("serve", path=os.path.dirname(sys.executable)) or shutil.which("serve")
    port = free_port()
    config = tmp_path / "fluxc.yaml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "fluxc", "route_prefix": "/", "import_path": "fluxc.runtime.serve.ray_app:app_builder",
                          "args": {"engine": tiny_pipeline_b4_path, "num_replicas": 2, "num_gpus": 0,
                                   "num_cpus": 0.5}}]}))
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    s = Server([serve_cli, "run", str(config)], port, env=env, timeout=300)
    try:
        pids = {httpx.get(s.url + "/health/ready").json()["pid"] for _ in range(40)}  # Ray spreads requests
        assert len(pids) == 2, pids
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda seed: client.images.generate(
                prompt="a red barn", size=SIZE, extra_body={"steps": 2, "seed": seed}), (1, 2, 3, 4)))
        for seed, result in zip((1, 2, 3, 4), results):
            want = np.asarray(engine.generate("a red barn", height=144, width=112, steps=2, seed=seed)[0], dtype=int)
            # Ray runs a replica of num_cpus=0.5 with OMP_NUM_THREADS=1: other reduction orders, so an fp32
            # value may round to the neighbouring 8-bit level
            assert np.abs(png(result.data[0].b64_json).astype(int) - want).max() <= 1
    finally:
        s.proc.send_signal(signal.SIGINT)
        s.proc.wait(timeout=120)


# ---- a context-parallel engine: the server is rank 0, the other ranks follow (runtime/serve/ranks.py) ----------
@pytest.fixture(scope="module")
def parallel_engines(tmp_path_factory, tiny_pipeline_dir):
    """Whole-pipeline fp32 engines for 1 and 2 ranks at 128x112 (56 image and 16 text tokens: 2 ranks split them)."""
    from conftest import build_tiny_pipeline

    root = tmp_path_factory.mktemp("serve-parallel")
    return {n: build_tiny_pipeline(tiny_pipeline_dir, str(root / f"ws{n}.fluxe"), resolutions=((128, 112),),
                                   text_tokens=16, world_size=n) for n in (1, 2)}


def test_context_parallel_engine_serves_the_one_rank_image(parallel_engines):
    """A --world-size 2 engine behind one server (two gloo ranks): the openai client gets the image a one-rank
    engine makes with the same prompt and seed (the ranks' float images agree to 1e-3: PNG values within 1);
    an edit is refused with the reason; SIGTERM stops both ranks, exit 0."""
    from fluxc.runtime import Engine

    prompt = "a photo of a cat sitting on a red chair"
    server = fluxc_serve(parallel_engines[2])
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        got = png(client.images.generate(prompt=prompt, size="112x128", extra_body=dict(steps=4, seed=3)).data[0].b64_json)
        want = np.asarray(Engine.load(parallel_engines[1]).generate(prompt, height=128, width=112, steps=4, seed=[3])[0])
        assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).max() <= 1
        buf = io.BytesIO()
        Image.fromarray(want).save(buf, format="PNG")
        with pytest.raises(openai.BadRequestError, match="not served on context-parallel engines"):
            client.images.edit(image=("in.png", buf.getvalue(), "image/png"), prompt=prompt, size="112x128")
    finally:
        assert server.stop() == 0, "".join(server.log)


def test_a_dead_rank_ends_the_server_with_exit_1(parallel_engines):
    """Rank 1 killed: the server reports which rank died and exits 1 at once instead of hanging in a collective."""
    server = fluxc_serve(parallel_engines[2])
    children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(p) == server.proc.pid]
    assert len(children) == 1
    os.kill(children[0], signal.SIGKILL)
    assert server.proc.wait(timeout=60) == 1
    time.sleep(0.2)  # the log thread catches up
    assert "rank 1 of 2" in "".join(server.log)


def _parent(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return None
