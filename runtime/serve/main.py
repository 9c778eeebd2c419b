"""serve(): the app under uvicorn on one host and port; `python -m fluxc.runtime.serve ENGINE` without the CLI.

SIGTERM (or Ctrl-C) stops accepting connections, lets uvicorn answer every request it accepted, lets the worker run
what is queued, and returns 0. A start that fails (engine missing, unsigned, damaged) returns 1 with the reason.
"""

import argparse
import logging
import signal
import subprocess
import sys
import threading

from fluxc.runtime.core.errors import FluxcError
from fluxc.runtime.serve.settings import ServeSettings


def check_engine(path: str, settings: ServeSettings) -> int:
    """The cheap checks, before the port is bound: the engine's seal and signature, and that it makes images.
    Returns its world size (ranks of context parallelism)."""
    from fluxc.runtime.core.bundle import read_manifest

    manifest = read_manifest(path, list(settings.trusted_keys) or None)
    if manifest["components"] is None:
        raise FluxcError(f"'{path}' was built with --transformer-only: it has no text encoders or VAE, so it cannot "
                         "turn prompts into images.", "Serve an engine built without --transformer-only.")
    return manifest["profiles"][0]["world_size"]


def parse_adapters(values) -> tuple[tuple[str, str], ...]:
    """--lora NAME=FILE values -> ((name, path), ...), each file present and each name once."""
    import os

    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise FluxcError(f"--lora {value!r} is not NAME=FILE.", "Write e.g. --lora style=style.fluxa.")
        if name in out:
            raise FluxcError(f"--lora names {name!r} twice.", "Give each adapter its own name.")
        if not os.path.isfile(path):
            raise FluxcError(f"--lora {value}: no adapter file at '{path}'.",
                             "Make one with `fluxc adapter ENGINE LORA.safetensors -o NAME.fluxa`.")
        out[name] = path
    return tuple(out.items())


def serve(path: str, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings = ServeSettings(),
          log_level: str = "info") -> int:
    """Serve until SIGTERM/SIGINT; the exit code (0 after a graceful stop, 1 if the engine failed to start)."""
    import uvicorn

    from fluxc.runtime.serve.app import create_app

    world_size = check_engine(path, settings)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    followers = []
    if world_size > 1:  # this process is rank 0; the others follow its engine calls (serve/ranks.py)
        from fluxc.runtime.serve.ranks import start_followers, watch

        followers = start_followers(path, world_size, settings.encoders, settings.trusted_keys)
        watch(followers)
    app = create_app(path, settings, leader=world_size > 1)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=30))
    worker = app.state.worker

    def stop_if_start_failed():
        worker.ready.wait()
        if worker.failure is not None:
            server.should_exit = True

    threading.Thread(target=stop_if_start_failed, daemon=True).start()
    # uvicorn re-raises the signal that stopped it once it is done; these handlers make that a normal return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in followers:  # told to stop at the worker's end; after a failed start, or a rank that hangs, ended
            try:
                proc.wait(timeout=60 if worker.failure is None else 0)
            except subprocess.TimeoutExpired:
                proc.kill()
    if worker.failure is not None:
        failure = worker.failure
        raise failure if isinstance(failure, FluxcError) else FluxcError(
            f"The engine failed to start: {failure!r}.", "See the log above; this is a fluxc bug if the engine loads "
            "with `fluxc run`.")
    return 0


def arguments(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m fluxc.runtime.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("engine")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-queue", type=int, default=ServeSettings.max_queue)
    ap.add_argument("--batch-window-ms", type=float, default=ServeSettings.batch_window_ms)
    ap.add_argument("--timeout", type=float, default=ServeSettings.timeout_s)
    ap.add_argument("--max-n", type=int, default=ServeSettings.max_n)
    ap.add_argument("--api-key-env", default=None)
    ap.add_argument("--trusted-key", action="append", default=[])
    ap.add_argument("--lora", action="append", default=[], metavar="NAME=FILE")
    return ap.parse_args(argv)


def api_key(env: str | None) -> str | None:
    """The key from environment variable `env` (a key on the command line would show in `ps`)."""
    import os

    if env is None:
        return None
    key = os.environ.get(env)
    if not key:
        raise FluxcError(f"--api-key-env {env} was given, but ${env} is empty or unset.",
                         f"export {env}=<a long random key>, or drop --api-key-env to serve without a key.")
    return key


def main(argv=None) -> int:
    a = arguments(argv)
    try:
        settings = ServeSettings(max_queue=a.max_queue, batch_window_ms=a.batch_window_ms, timeout_s=a.timeout,
                                 max_n=a.max_n, api_key=api_key(a.api_key_env), trusted_keys=tuple(a.trusted_key),
                                 adapters=parse_adapters(a.lora))
        return serve(a.engine, a.host, a.port, settings)
    except FluxcError as e:
        print(f"error: {e.message}" + (f"\n  remedy: {e.remedy}" if e.remedy else ""), file=sys.stderr)
        return 1
