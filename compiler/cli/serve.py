import click

from fluxc.runtime.serve.settings import ServeSettings

_D = ServeSettings()


@click.command("serve")
@click.argument("engine", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (0.0.0.0: every interface).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--max-queue", type=int, default=_D.max_queue, show_default=True,
              help="Images waiting for the GPU before requests get 429.")
@click.option("--batch-window-ms", type=float, default=_D.batch_window_ms, show_default=True,
              help="How long a batch that is not full waits for more requests with its size and settings.")
@click.option("--timeout", "timeout_s", type=float, default=_D.timeout_s, show_default=True,
              help="Seconds a request may take, queue included, before 504.")
@click.option("--max-n", type=int, default=_D.max_n, show_default=True, help="Images per request.")
@click.option("--api-key-env", default=None, metavar="VAR",
              help="Require `Authorization: Bearer $VAR` on /v1 requests (the key is read from that variable).")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False),
              help="Ed25519 public key (PEM); repeat for several. Given, the engine must be signed by one of them.")
@click.option("--lora", "loras", multiple=True, metavar="NAME=FILE",
              help="Register a LoRA adapter (.fluxa from `fluxc adapter`) that requests name in extra_body "
                   "{\"lora\": [{\"name\": NAME, \"scale\": 0.8}]}; repeat for several.")
@click.option("--encoders", type=click.Choice(["gpu", "offload", "cpu"]), default=None,
              help="Where the text encoders stay between prompts (default: as built).")
def command(engine, host, port, max_queue, batch_window_ms, timeout_s, max_n, api_key_env, trusted_keys, loras,
            encoders):
    """Serve an engine over HTTP with OpenAI's images API (needs `pip install fluxc[serve]`).

    Typical use: fluxc serve dev.fluxe --port 8000, then from Python: OpenAI(base_url="http://127.0.0.1:8000/v1",
    api_key="-").images.generate(prompt="a cat", size="1024x1024"). /health/ready answers 200 once the engine is
    loaded and warm; /metrics is Prometheus'; / is a playground page. SIGTERM finishes accepted requests, exits 0.
    """
    from fluxc.runtime.core.errors import FluxcError

    try:
        from fluxc.runtime.serve.main import api_key, parse_adapters, serve
    except ImportError as e:
        raise FluxcError(f"fluxc serve needs the serving extra ({e.name} is missing).",
                         "pip install 'fluxc[serve]'") from None
    settings = ServeSettings(max_queue=max_queue, batch_window_ms=batch_window_ms, timeout_s=timeout_s, max_n=max_n,
                             api_key=api_key(api_key_env), trusted_keys=tuple(trusted_keys), encoders=encoders,
                             adapters=parse_adapters(loras))
    serve(engine, host, port, settings)
