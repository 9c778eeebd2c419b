"""The server's Prometheus metrics, in a registry of the app's own (several apps in one process stay apart)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGES = ("queue", "adapters", "encode", "denoise", "decode", "png", "request")  # request: arrival to response, all stages
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queued = Gauge("fluxc_queue_images", "Images waiting for the GPU.", registry=r)
        self.in_flight = Gauge("fluxc_requests_in_flight", "Image requests accepted and not yet answered.", registry=r)
        self.batch = Histogram("fluxc_batch_images", "Images per engine call (the engine pads to its batch).",
                               buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.stage = Histogram("fluxc_stage_seconds", "Seconds per stage of an image request.", ["stage"],
                               buckets=_SECONDS, registry=r)
        self.images = Counter("fluxc_images", "Images returned to clients.", registry=r)
        self.errors = Counter("fluxc_errors", "Failed image requests by kind.", ["kind"], registry=r)
        self.swaps = Counter("fluxc_adapter_swaps", "Changes of the engine's LoRA adapter set between batches.",
                             registry=r)
        self.ready = Gauge("fluxc_ready", "1 once the engine is loaded and every profile warmed up.", registry=r)
        self.startup = Gauge("fluxc_startup_seconds", "Seconds of the start, by phase.", ["phase"], registry=r)
