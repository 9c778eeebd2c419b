"""The denoising loop's machinery: one Euler step as CUDA-graphed pieces, the clocks, and batching by chunks.

A step without a cache policy is one piece: the whole transformer (head, every block, tail) and the Euler update,
captured as one CUDA graph per profile. With a cache policy (cache.py) it is three: the head up to the cut with
the skip decision, then either the rest of the stack or the reuse of its remembered residual. On one GPU the three
are one CUDA graph whose two branches are conditional (IF) nodes on the decision's flag, so the GPU picks the
branch and the loop never waits for it; a context-parallel step (collectives in the branches) reads the flag on the
host instead and launches the branch's own graph. The engine (engine.py) owns the segments; a step calls its head /
blocks / tail.
"""

import time
from contextlib import contextmanager

import torch

from fluxc.runtime import cache, parallel
from fluxc.runtime.core import flux_math
from fluxc.runtime.core.cache_config import PROBE_OUTPUT, PROBE_SUFFIX
from fluxc.runtime.core.profile import Profile


def chunked(fn, batch: int, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """fn over rows of `inputs` in chunks of the segments' static batch; the last chunk is padded by
    repeating its last row, and the padding is dropped from the concatenated outputs."""
    n = inputs[0].shape[0]
    outs = []
    for start in range(0, n, batch):
        chunk = [x[start:start + batch] for x in inputs]
        pad = batch - chunk[0].shape[0]
        if pad:
            chunk = [torch.cat([x, x[-1:].expand(pad, *x.shape[1:])]) for x in chunk]
        outs.append([y[:batch - pad] for y in fn(*chunk)])
    return [ys[0] if len(ys) == 1 else torch.cat(ys) for ys in zip(*outs)]


class StepClock:
    """Milliseconds between ticks (and from the last tick to done()): CUDA events recorded on the stream, read
    once at the end, on a GPU; the wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def tick(self) -> None:
        if self.cuda:
            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(time.perf_counter())

    def done(self) -> list[float]:
        self.tick()
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


class StageClock:
    """Wall seconds per stage into `timings` (synchronizing the GPU at stage ends), or nothing."""

    def __init__(self, device: torch.device, timings: dict | None):
        self.device, self.timings = device, timings

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        if self.timings is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings[name] = time.perf_counter() - start


class Step:
    """One Euler step as a list of pieces over the loop's state buffers, each captured as a CUDA graph (all in
    one memory pool) when `graphed`, else run as is. run() runs the step (a cached step leaves its decision in
    state["cache_skip"], a 0-d bool on the device)."""

    def __init__(self, engine, profile: Profile, config, state: dict, graphed: bool):
        self.engine, self.profile, self.config = engine, profile, config
        self.state = {k: v.clone() for k, v in state.items()} if graphed else state
        self.pieces = self._pieces()
        self.graphs = self._capture() if graphed else None

    def _capture(self) -> list[torch.cuda.CUDAGraph]:
        return capture(self.pieces)

    def _pieces(self) -> list:
        return [lambda: self._finish(self.engine.transformer(self.profile, self.state))]

    def _finish(self, noise_pred: torch.Tensor) -> None:
        """The Euler update of the latents in place; inpainting then resets the kept part (mask 0) to the image
        noised to the next step's sigma (0 after the last: the image itself; FluxInpaintPipeline's blend)."""
        s = self.state
        latents = flux_math.euler_step(s["hidden_states"], noise_pred, s["dt"])
        if "inpaint_mask" in s:
            proper = s["inpaint_sigma"] * s["inpaint_noise"] + (1 - s["inpaint_sigma"]) * s["inpaint_image"]
            latents = (1 - s["inpaint_mask"]) * proper + s["inpaint_mask"] * latents
        s["hidden_states"].copy_(latents)

    def _piece(self, i: int) -> None:
        if self.graphs is None:
            self.pieces[i]()
        else:
            self.graphs[i].replay()

    def run(self) -> None:
        self._piece(0)

    def load(self, state: dict) -> None:
        """Copy the caller's inputs into the captured buffers (the warm-up changed them)."""
        for k, v in state.items():
            self.state[k].copy_(v)


class CachedStep(Step):
    """A step with a cache policy: the head up to the cut with the decision, then the rest of the stack or
    the reuse of its remembered residual. Graphed on one GPU, the three are one graph with the branches as
    conditional nodes (`branched`); otherwise the host reads the decision's flag (one sync per step) and runs
    the branch's piece."""

    branched = False

    def _pieces(self) -> list:
        return [self._head, self._rest, self._reuse]

    def _head(self) -> None:
        """Head (and FBCache's first block), the probe and the decision: the streams at the cut and the probe."""
        e, profile, config, state = self.engine, self.profile, self.config, self.state
        acts = e.head(profile, state)
        first = e.double_layers(profile)[0]
        if config.policy == "fbcache":
            before = acts["hidden_states"]
            acts |= e.run_segment("double", profile, first, acts)
            self.probe = acts["hidden_states"] - before  # the first block's residual
        else:  # TeaCache: the first block's modulated input
            self.probe = e.run_segment("double" + PROBE_SUFFIX, profile, first, acts)[PROBE_OUTPUT]
        cache.decide(config, state, self.probe, parallel.all_reduce)  # every rank decides on all tokens
        self.cut = acts

    def _rest(self) -> None:
        """The rest of the stack from the cut; remembers its residual (and FBCache's probe) for later skips."""
        e, profile, config, state, cut = self.engine, self.profile, self.config, self.state, self.cut
        acts = dict(cut)
        e.blocks(profile, acts, first=1 if config.policy == "fbcache" else 0)
        state["cache_tail"].copy_(acts["hidden_states"] - cut["hidden_states"])
        if config.policy == "fbcache":
            state["cache_prev"].copy_(self.probe)
        self._finish(e.tail(profile, acts))

    def _reuse(self) -> None:
        """A skipped step: the stream at the cut plus the remembered residual of the rest, then the tail."""
        acts = dict(self.cut, hidden_states=self.cut["hidden_states"] + self.state["cache_tail"])
        self._finish(self.engine.tail(self.profile, acts))

    def _capture(self) -> list[torch.cuda.CUDAGraph]:
        self.branched = parallel.world_size() == 1 and conditional_nodes()
        return capture(self.pieces, [self._branches] if self.branched else None)

    def _branches(self) -> None:
        """The whole step, captured: the head, then the reuse if the flag is set and the rest if it is not, each
        a CUDA IF node whose predicate the GPU reads when the graph reaches it."""
        self._head()
        skip = self.state["cache_skip"]
        run = ~skip  # before either branch (neither writes the flag, but the order should not matter)
        graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
        for flag, body in ((skip, self._reuse), (run, self._rest)):
            graph.begin_capture_to_if_node(flag)
            try:
                body()
            finally:
                graph.end_capture_to_conditional_node()

    def run(self) -> None:
        if self.branched:
            self.graphs[0].replay()
        else:
            self._piece(0)
            self._piece(2 if bool(self.state["cache_skip"]) else 1)  # the flag read: a host sync


def conditional_nodes() -> bool:
    """Whether this torch can capture CUDA graph conditional nodes (CUDA 12.4 and later)."""
    cuda = tuple(int(x) for x in (torch.version.cuda or "0.0").split(".")[:2])
    return cuda >= (12, 4) and hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node")


def capture(pieces: list, captured: list | None = None) -> list[torch.cuda.CUDAGraph]:
    """CUDA graphs of `pieces` (or of `captured`, functions that call them), sharing one memory pool (later pieces
    read earlier pieces' outputs). Every piece is warmed up first, outside capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside capture: lazy init, autotuning
        for _ in range(2):
            for piece in pieces:
                piece()
    torch.cuda.current_stream().wait_stream(side)
    graphs, pool = [], None
    for piece in captured or pieces:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            piece()
        pool = pool or graph.pool()
        graphs.append(graph)
    return graphs
