"""create_app(engine, settings): the FastAPI app that `fluxc serve` runs under uvicorn and Ray Serve runs per replica.

Routes: POST /v1/images/generations and GET /v1/models (OpenAI's images API; with an API key set, both need
`Authorization: Bearer <key>`), /health/live, /health/ready, /metrics (Prometheus) and the playground at /.
Every failure is answered in one place (_failure) with OpenAI's error body: 400 for a FluxcError (the message and
remedy the CLI prints), 422 for a body FastAPI cannot parse, 401, 404 unknown model, 429 queue full (Retry-After),
503 not ready, 504 past the deadline, 500 for a bug (logged; the worker goes on).
"""

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import math
import os
import secrets
import time
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fluxc.runtime.core.errors import FluxcError
from fluxc.runtime.serve import api
from fluxc.runtime.serve.metrics import Metrics
from fluxc.runtime.serve.png import encode_png
from fluxc.runtime.serve.settings import ServeSettings
from fluxc.runtime.serve.worker import Job, NotAccepting, QueueFull, Worker, log


class Failure(Exception):
    """An HTTP answer other than 200, in OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str, code: str, headers: dict | None = None):
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers


class ClientGone(Exception):
    pass


def create_app(engine, settings: ServeSettings = ServeSettings(), leader: bool = False) -> FastAPI:
    """engine: an engine folder, or a function returning a loaded Engine (called on the worker thread). leader: this
    process is rank 0 of a context-parallel engine whose other ranks it started (serve/ranks.py)."""
    if isinstance(engine, str):
        path, load = engine, _loader(engine, settings, leader)
    else:
        path, load = None, engine
    name = settings.model_name or (os.path.basename(os.path.normpath(path)).removesuffix(".fluxe") if path else "fluxc")
    metrics = Metrics()
    worker = Worker(load, settings.max_queue, settings.batch_window_ms / 1e3, metrics, dict(settings.adapters))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        if settings.wait_ready:
            await asyncio.to_thread(worker.ready.wait)
            if worker.failure is not None:
                raise worker.failure
        yield
        await asyncio.to_thread(worker.stop)  # uvicorn has answered every request by now

    app = FastAPI(title="fluxc", lifespan=lifespan)
    app.state.worker, app.state.metrics, app.state.settings = worker, metrics, settings
    _add_failure_handlers(app, metrics)
    authorized = Depends(_authorizer(settings.api_key))

    @app.post("/v1/images/generations", response_model=api.ImagesResponse, dependencies=[authorized])
    async def generations(body: api.ImagesRequest, request: Request):
        return await _answer(_job(_ready(worker), body, settings, name), request)

    async def _answer(job: Job, request: Request) -> api.ImagesResponse:
        """Queue the job, await its images, answer with them as PNGs."""
        start = time.perf_counter()
        try:
            worker.submit(job)
        except QueueFull:
            raise Failure(429, f"The queue is full ({settings.max_queue} images waiting); try again shortly.",
                          "rate_limit_error", "queue_full",
                          {"Retry-After": str(max(1, math.ceil(worker.last_call_s)))}) from None
        except NotAccepting:
            raise _not_ready(worker) from None
        metrics.in_flight.inc()
        try:
            images = await _outcome(worker, job, request, settings.timeout_s)
            png_start = time.perf_counter()
            encoded = await asyncio.to_thread(_pngs, images)
            metrics.stage.labels("png").observe(time.perf_counter() - png_start)
        finally:
            metrics.in_flight.dec()
        metrics.images.inc(len(encoded))
        metrics.stage.labels("request").observe(time.perf_counter() - start)
        return api.ImagesResponse(created=int(time.time()),
                                  data=[api.Image(b64_json=b, seed=s) for b, s in zip(encoded, job.seeds)])

    @app.post("/v1/images/edits", response_model=api.ImagesResponse, dependencies=[authorized])
    async def edits(request: Request):
        """OpenAI's images.edit: multipart form with the image file (and a mask: inpainting); image to image with
        FluxImg2ImgPipeline's semantics, FluxInpaintPipeline's with a mask, on an engine built with image tasks."""
        form = await request.form()
        fields = {k: v for k, v in form.items() if k not in ("image", "mask")}
        if "image" not in form or isinstance(form["image"], str):
            raise FluxcError("The request has no image file.", "Send the image as the multipart file field `image`.")
        try:
            body = api.EditRequest.model_validate(fields)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        image = _read_image(await form["image"].read())
        mask = _read_mask(await form["mask"].read()) if "mask" in form and not isinstance(form["mask"], str) else None
        return await _answer(_job(_ready(worker), body, settings, name, image, mask), request)

    @app.get("/v1/models", response_model=api.ModelList, dependencies=[authorized])
    async def models():
        engine = _ready(worker)
        return api.ModelList(data=[api.Model(
            id=name, created=int(os.path.getmtime(path)) if path else 0, batch=worker.batch, max_n=settings.max_n,
            max_steps=settings.max_steps, sizes=[api.openai_size(p) for p in engine.profiles.values()],
            cache=engine.cache_config().policy, adapters=list(worker.adapters))])

    @app.get("/health/live")
    async def live():
        return {"status": "live"}

    @app.get("/health/ready")
    async def ready():
        _ready(worker)
        return {"status": "ready", "model": name, "startup_seconds": worker.timings, "pid": os.getpid()}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return resources.files("fluxc.runtime.serve").joinpath("playground.html").read_text(encoding="utf-8")

    return app


def _loader(path: str, settings: ServeSettings, leader: bool):
    def load():
        from fluxc.runtime import Engine

        keys = list(settings.trusted_keys) or None
        if leader:
            from fluxc.runtime.serve.ranks import Leader

            return Leader.load(path, settings.encoders, keys)
        return Engine.load(path, encoders=settings.encoders, trusted_keys=keys)

    return load


def _ready(worker: Worker):
    """The engine, once loaded and warm; else a 503."""
    if not worker.ready.is_set() or worker.failure is not None:
        raise _not_ready(worker)
    return worker.engine


def _not_ready(worker: Worker) -> Failure:
    if worker.failure is not None:
        why = f"the engine failed to start: {getattr(worker.failure, 'message', worker.failure)}"
    else:
        why = "the engine is still loading and warming up" if not worker.ready.is_set() else "the server is stopping"
    return Failure(503, f"Not ready: {why}.", "server_error", "not_ready", {"Retry-After": "1"})


def _read_image(data: bytes):
    """An uploaded image file as an RGB PIL image (PNG, JPEG, WebP; an alpha channel is dropped)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError):
        raise FluxcError("The image file could not be read as an image.", "Send a PNG, JPEG or WebP file.") from None


def _read_mask(data: bytes):
    """An uploaded mask as the grey mask Engine.generate takes (white: repaint). OpenAI's convention for a mask with
    an alpha channel: its transparent pixels are the ones to edit; a mask without one is read as grey levels."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return ImageOps.invert(im.getchannel("A")) if "A" in im.getbands() else im.convert("L")
    except (OSError, UnidentifiedImageError):
        raise FluxcError("The mask file could not be read as an image.", "Send a PNG mask.") from None


def _job(engine, body: api.ImagesRequest, settings: ServeSettings, name: str, image=None, mask=None) -> Job:
    """The request checked (the server's limits, then every check Engine.generate makes) and made a job; with an
    image (edits), image to image at body.strength, the size defaulting to the image's."""
    if body.model is not None and body.model != name:
        raise Failure(404, f"The model '{body.model}' does not exist; this server serves '{name}'.",
                      "invalid_request_error", "model_not_found")
    api.check_request(body, settings)
    size = body.size if body.size is not None or image is None else f"{image.width}x{image.height}"
    height, width = api.parse_size(size, engine.profiles.values())
    cache_config = engine.cache_config(policy=body.cache, threshold=body.cache_threshold)
    prompts, profile = engine.check_generation(body.prompt, height=height, width=width, steps=body.steps,
                                               guidance=body.guidance, cache_config=cache_config)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**63)
    seeds = [(seed + i) % 2**64 for i in range(body.n)]
    sampling = dict(height=profile.height, width=profile.width, steps=body.steps, guidance=float(body.guidance),
                    cache_config=cache_config)
    if image is not None:
        if engine.world_size > 1:  # its other ranks take their calls as JSON (serve/ranks.py): no images yet
            raise FluxcError("Edits are not served on context-parallel engines yet.",
                             "Serve an engine built with --world-size 1 for /v1/images/edits.")
        engine.check_image(image, 1, profile, body.steps, body.strength, mask)
        sampling |= dict(image=image, strength=float(body.strength), mask=mask)  # batched only with equal images
    return Job(prompts[0], seeds, sampling, tuple((ref.name, float(ref.scale)) for ref in body.lora))


async def _outcome(worker: Worker, job: Job, request: Request, timeout: float):
    """The job's images; a 504 past the deadline, ClientGone if the client disconnects (the job is then dropped)."""
    result = asyncio.wrap_future(job.future)
    gone = asyncio.create_task(_disconnected(request))
    done, _ = await asyncio.wait({result, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if result in done:
        return result.result()
    worker.cancel(job)
    result.add_done_callback(lambda f: f.cancelled() or f.exception())  # a discarded result's error is not news
    if gone in done:
        raise ClientGone()
    raise Failure(504, f"The request took longer than the server's limit of {timeout:g} s.", "server_error", "timeout")


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away. The body has been read, so the next ASGI message is the disconnect: waiting
    for it costs nothing (polling is_disconnected woke the event loop 20 times a second beside the GPU thread)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _pngs(images) -> list[str]:
    """float [N, H, W, 3] in [0, 1] -> base64 PNGs, rounded as Engine.generate's PIL images are."""
    from fluxc.runtime.engine import to_pixels

    return [base64.b64encode(encode_png(p)).decode("ascii") for p in to_pixels(images)]


def _authorizer(key: str | None):
    """A dependency that checks `Authorization: Bearer <key>` in constant time (digests of equal length)."""
    want = hashlib.sha256(key.encode()).digest() if key else None

    async def check(request: Request) -> None:
        if want is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(hashlib.sha256(token.encode()).digest(), want):
            raise Failure(401, "Incorrect or missing API key (send `Authorization: Bearer <key>`).",
                          "invalid_request_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    return check


def _add_failure_handlers(app: FastAPI, metrics: Metrics) -> None:
    def answer(status: int, message: str, kind: str, code: str, headers: dict | None = None) -> JSONResponse:
        metrics.errors.labels(code).inc()
        return JSONResponse(api.error_body(message, kind, code), status_code=status, headers=headers)

    @app.exception_handler(Failure)
    async def failure(request, e: Failure):
        return answer(e.status, e.message, e.kind, e.code, e.headers)

    @app.exception_handler(FluxcError)
    async def bad_input(request, e: FluxcError):
        return answer(400, f"{e.message} Remedy: {e.remedy}" if e.remedy else e.message, "invalid_request_error",
                      "invalid_value")

    @app.exception_handler(RequestValidationError)
    async def unparsable(request, e: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in err['loc'][1:]) or 'body'}: {err['msg']}" for err in e.errors()]
        return answer(422, "The request body does not fit the images API: " + "; ".join(parts) + ".",
                      "invalid_request_error", "invalid_body")

    @app.exception_handler(ClientGone)
    async def client_gone(request, e):
        return answer(499, "The client closed the connection.", "client_error", "client_gone")

    @app.exception_handler(Exception)
    async def bug(request, e: Exception):
        log.error("internal error answering %s: %r", request.url.path, e, exc_info=e)
        return answer(500, f"Internal error ({type(e).__name__}); the server goes on. This is a fluxc bug: "
                      "please report it with the server's log.", "server_error", "internal_error")
