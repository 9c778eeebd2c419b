"""The GPU side of the server: one thread owns the engine and runs batches from one bounded queue.

The thread loads the engine (verified, as Engine.load always does), warms every profile up (so each one's CUDA
graphs are captured before the server reports ready), then loops: take the oldest job, add later jobs with the
same profile and settings until the engine's batch is full or the batch window has passed, and run them as one
Engine.generate call with one seed per image. The event loop submits jobs and awaits their futures; it never
touches the GPU. A job cancelled while queued (deadline, client gone) is dropped; one cancelled while running
finishes and its images are discarded.
"""

import collections
import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import Future

from fluxc.runtime.core.errors import FluxcError

log = logging.getLogger("fluxc.serve")


def _process_start() -> float:
    """When this process started (epoch seconds; Linux's /proc, else this module's import)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return _IMPORTED


_IMPORTED = time.time()


class QueueFull(Exception):
    pass


class NotAccepting(Exception):
    """The worker is stopping, failed to start, or is not ready yet."""


@dataclasses.dataclass(eq=False)
class Job:
    prompt: str
    seeds: list[int]  # one image per seed
    settings: dict  # Engine.generate's keyword arguments: height, width, steps, guidance, cache_config
    adapters: tuple[tuple[str, float], ...] = ()  # (registered name, scale): one adapter set per batch
    future: Future = dataclasses.field(default_factory=Future)  # -> float images [n, H, W, 3] on the CPU
    queued_at: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple:
        """Jobs batch together only when their keys are equal (the same profile, sampling settings and adapters)."""
        return self.adapters, tuple(sorted(self.settings.items()))


class Worker:
    def __init__(self, load, max_queue: int, window_s: float, metrics, adapters: dict[str, str] | None = None):
        """load() -> Engine, called on the worker's thread; adapters: name -> .fluxa path, read and checked at start."""
        self._load, self.max_queue, self.window_s, self.metrics = load, max_queue, window_s, metrics
        self._adapter_files, self.adapters = dict(adapters or {}), {}
        self._adapter_set: tuple = ()  # the set the engine holds now
        self.engine = None
        self.ready = threading.Event()  # set once loaded and warm, or once the start failed (see self.failure)
        self.failure: BaseException | None = None
        self.timings: dict[str, float] = {}
        self.last_call_s = 0.0  # the last engine call's seconds: about when a full queue frees its next places
        self._jobs: collections.deque[Job] = collections.deque()
        self._queued = 0  # images in self._jobs
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="fluxc-gpu", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Run what is queued, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

    @property
    def batch(self) -> int:
        return self.engine.profile_for().batch

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping or not self.ready.is_set() or self.failure is not None:
                raise NotAccepting()
            if self._queued + len(job.seeds) > self.max_queue:
                raise QueueFull()
            self._jobs.append(job)
            self._queued += len(job.seeds)
            self.metrics.queued.set(self._queued)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Drop a queued job; a running one finishes and its result goes nowhere."""
        with self._cond:
            if job.future.cancel():
                self._jobs.remove(job)
                self._queued -= len(job.seeds)
                self.metrics.queued.set(self._queued)

    # ---- the thread ----------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._start_engine()
        except BaseException as e:  # reported by /health/ready and the server's exit; the thread ends
            self.failure = e
            log.error("the engine did not start: %s", e, exc_info=not isinstance(e, FluxcError))
            self.ready.set()
            return
        self.ready.set()
        while (batch := self._next_batch()) is not None:
            self._run(batch)
        close = getattr(self.engine, "close", None)  # a context-parallel engine's rank 0 stops the other ranks
        if close is not None:
            close()

    def _start_engine(self) -> None:
        start = time.perf_counter()
        self.engine = self._load()
        self.adapters = {name: self.engine.load_adapter(path) for name, path in self._adapter_files.items()}
        self.timings["load"] = time.perf_counter() - start
        self.timings |= {f"load.{phase}": s for phase, s in getattr(self.engine, "load_seconds", {}).items()}
        for profile in self.engine.profiles.values():  # captures each profile's CUDA graphs (default cache policy)
            self.engine.generate("warm-up", height=profile.height, width=profile.width, steps=2, output_type="pt")
        self.timings["warm_up"] = time.perf_counter() - start - self.timings["load"]
        self.timings["process_to_ready"] = time.time() - _process_start()
        for phase, seconds in self.timings.items():
            self.metrics.startup.labels(phase).set(seconds)
        self.metrics.ready.set(1)

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and the later ones that share its key, up to the engine's batch (or the oldest alone if it
        is larger); waits up to the batch window for more while the batch is not full. None: stopping and empty."""
        with self._cond:
            while not self._jobs:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._jobs.popleft()
            batch, size, until = [first], len(first.seeds), time.monotonic() + self.window_s
            while size < self.batch:
                for job in [j for j in self._jobs if j.key == first.key]:
                    if size + len(job.seeds) <= self.batch:
                        self._jobs.remove(job)
                        batch.append(job)
                        size += len(job.seeds)
                left = until - time.monotonic()
                if size >= self.batch or left <= 0 or self._stopping:
                    break
                self._cond.wait(left)
            self._queued -= size
            self.metrics.queued.set(self._queued)
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _run(self, batch: list[Job]) -> None:
        if not batch:
            return
        now = time.perf_counter()
        for job in batch:
            self.metrics.stage.labels("queue").observe(now - job.queued_at)
        prompts = [job.prompt for job in batch for _ in job.seeds]
        timings = {}
        try:
            self._use_adapters(batch[0].adapters)
            images = self.engine.generate(prompts, seed=[s for job in batch for s in job.seeds], output_type="pt",
                                          timings=timings, **batch[0].settings)
            self.last_call_s = time.perf_counter() - now
        except Exception as e:  # the app answers 400 for a FluxcError, 500 for anything else; the thread goes on
            if not isinstance(e, FluxcError):
                log.exception("engine call failed for a batch of %d image(s)", len(prompts))
            for job in batch:
                job.future.set_exception(e)
            return
        self.metrics.batch.observe(len(prompts))
        for stage, seconds in timings.items():
            self.metrics.stage.labels(stage).observe(seconds)
        start = 0
        for job in batch:
            job.future.set_result(images[start:start + len(job.seeds)])
            start += len(job.seeds)

    def _use_adapters(self, adapters: tuple) -> None:
        if adapters == self._adapter_set:
            return
        swap = self.engine.set_adapters([(self.adapters[name], scale) for name, scale in adapters])
        self._adapter_set = adapters
        self.metrics.swaps.inc()
        self.metrics.stage.labels("adapters").observe(swap["seconds"])
