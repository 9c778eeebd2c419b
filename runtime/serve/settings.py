"""The server's limits and options (no FastAPI here: the CLI and Ray's builder make one without importing it)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    model_name: str | None = None  # the `model` clients name; default: the engine folder's name without .fluxe
    max_queue: int = 64  # images waiting for the GPU; beyond it a request gets 429 with Retry-After
    batch_window_ms: float = 10.0  # how long a batch that is not full waits for more requests with its settings
    timeout_s: float = 600.0  # per request, queue and GPU together; then 504
    max_n: int = 4  # images per request
    max_prompt_chars: int = 4000  # OpenAI's limit for dall-e-3 prompts
    max_steps: int = 100
    api_key: str | None = None  # given: every /v1 request needs `Authorization: Bearer <key>`
    trusted_keys: tuple[str, ...] = ()  # Ed25519 public keys (PEM paths); given, the engine must be signed by one
    encoders: str | None = None  # Engine.load's encoder placement override
    adapters: tuple[tuple[str, str], ...] = ()  # (name, .fluxa path): the LoRA adapters requests may name
    wait_ready: bool = False  # hold the app's startup until the engine is warm (Ray Serve: route only to ready replicas)

    def __post_init__(self):
        from fluxc.runtime.core.errors import FluxcError

        for name in ("max_queue", "max_n", "max_prompt_chars", "max_steps"):
            if getattr(self, name) < 1:
                raise FluxcError(f"Server setting {name} is {getattr(self, name)}; it must be at least 1.",
                                 f"Set {name.replace('_', '-')} to 1 or more.")
        if self.batch_window_ms < 0 or self.timeout_s <= 0:
            raise FluxcError(f"batch_window_ms ({self.batch_window_ms}) must be 0 or more and timeout_s "
                             f"({self.timeout_s}) more than 0.", "Fix --batch-window-ms / --timeout.")
