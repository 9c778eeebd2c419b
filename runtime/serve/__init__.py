"""`fluxc serve`: an engine behind an OpenAI-compatible images API (optional extra: pip install fluxc[serve]).

    settings    ServeSettings: the server's limits and options
    api         request and response bodies (pydantic), OpenAI's error body, size parsing
    worker      one thread owns the engine (loads it, warms every profile up, runs batches from one bounded queue)
    metrics     the Prometheus metrics, in a registry of the app's own
    app         create_app(engine, settings): the FastAPI app (routes, auth, errors, health, metrics, playground)
    main        serve(): uvicorn around create_app, with graceful SIGTERM; `python -m fluxc.runtime.serve`
    ray_app     the same app as a Ray Serve deployment, one replica per GPU (`serve run fluxc.runtime.serve.ray_app:app_builder`)

Nothing in fluxc.runtime outside this package imports FastAPI, uvicorn, prometheus-client or Ray.
"""

from fluxc.runtime.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from fluxc.runtime.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'fluxc.runtime.serve' has no attribute {name!r}")
