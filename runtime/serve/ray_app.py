"""The server as a Ray Serve application: one replica per GPU, Ray's routing and autoscaling in front.

    serve run fluxc.runtime.serve.ray_app:app_builder engine=/engines/dev.fluxe num_replicas=4

or in a config file (`serve run config.yaml`, `serve deploy config.yaml`):

    http_options: {host: 127.0.0.1, port: 8000}
    applications:
      - name: fluxc
        import_path: fluxc.runtime.serve.ray_app:app_builder
        args: {engine: /engines/dev.fluxe, num_replicas: auto}

Each replica runs create_app, the app `fluxc serve` runs, with its start held until the engine is loaded and warm
(Ray routes to a replica once it has started). Arguments: engine (required; a path every node can read),
num_replicas (a number or "auto" for Ray's autoscaling), num_gpus (per replica, default 1), num_cpus (default 1),
and the server settings max_queue, batch_window_ms, timeout_s, max_n, api_key_env, trusted_key.
"""

from fluxc.runtime.core.errors import FluxcError
from fluxc.runtime.serve.main import api_key
from fluxc.runtime.serve.settings import ServeSettings

_SETTINGS = {"max_queue": int, "batch_window_ms": float, "timeout_s": float, "max_n": int}


def app_builder(args: dict):
    """Ray Serve's application builder (`serve run ...:app_builder key=value ...`)."""
    from ray import serve

    from fluxc.runtime.serve.app import create_app

    args = dict(args)
    if "engine" not in args:
        raise FluxcError("The Ray Serve application needs an engine.", "Pass engine=/path/to/engine.fluxe.")
    engine = args.pop("engine")
    replicas = args.pop("num_replicas", 1)
    resources = {"num_gpus": float(args.pop("num_gpus", 1)), "num_cpus": float(args.pop("num_cpus", 1))}
    keys = args.pop("trusted_key", None)
    settings = ServeSettings(api_key=api_key(args.pop("api_key_env", None)), wait_ready=True,
                             trusted_keys=tuple([keys] if isinstance(keys, str) else keys or ()),
                             **{name: _SETTINGS[name](args.pop(name)) for name in list(args) if name in _SETTINGS})
    if args:
        raise FluxcError(f"Unknown arguments {sorted(args)} for the fluxc Ray Serve application.",
                         "See fluxc.runtime.serve.ray_app's docstring for the ones it takes.")

    def build_app():  # run on each replica (a plain function: Ray takes other callables for ASGI apps)
        return create_app(engine, settings)

    @serve.ingress(build_app)
    class FluxcReplica:
        pass

    deployment = serve.deployment(FluxcReplica, name="fluxc", ray_actor_options=resources,
                                  num_replicas=replicas if replicas == "auto" else int(replicas),
                                  max_ongoing_requests=settings.max_queue + 16)  # the app's own queue limits
    return deployment.bind()
