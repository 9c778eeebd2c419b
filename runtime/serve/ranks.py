"""Serving a context-parallel engine (built with --world-size N): the server process is rank 0, and it starts the
other N - 1 ranks as follower processes that make every engine call rank 0 makes.

    server process (rank 0)                       followers (python -m fluxc.runtime.serve.ranks ENGINE)
      HTTP, queue, batching (app, worker)
      Leader(engine).generate(...)  -- the call -->  Engine.generate(...) with the same arguments
                                    <-- all-to-alls inside the step, the latents gathered on rank 0 -->

A call travels as JSON over a gloo group of its own (a length, then the bytes), never pickled; the engine's own
collectives (NCCL on GPUs, gloo on the CPU) are untouched. Only the calls the worker makes that every rank must
join are sent: generate, load_adapter, set_adapters, and stop at the end. Rank 0's images are the result.
A follower that dies is found by rank 0's watchdog, which reports it and ends the server with exit code 1 (a
collective would otherwise wait for the dead rank for parallel.COLLECTIVE_TIMEOUT); followers die with the server
(the kernel's parent-death signal), so none is left behind.
"""

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import torch

STOP = "stop"


def _send(group, method: str, kwargs: dict) -> None:
    import torch.distributed as dist

    data = json.dumps([method, kwargs]).encode()
    dist.broadcast(torch.tensor([len(data)], dtype=torch.int64), 0, group=group)
    dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, group=group)


def _receive(group) -> tuple[str, dict]:
    import torch.distributed as dist

    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, 0, group=group)
    data = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(data, 0, group=group)
    method, kwargs = json.loads(bytes(data.numpy()))
    return method, kwargs


def _join(path: str, encoders: str | None, trusted_keys):
    """This rank in the process group (torchrun's environment variables), the calls' gloo group, the engine."""
    import torch.distributed as dist

    from fluxc.runtime import Engine, parallel

    parallel.init()
    group = dist.new_group(backend="gloo")  # every rank creates it, in the same order
    return group, Engine.load(path, encoders=encoders, trusted_keys=trusted_keys)


class Leader:
    """The engine on rank 0: each call the other ranks must join is sent to them before rank 0 makes it; every
    other attribute is the engine's."""

    def __init__(self, engine, group):
        self._engine, self._group = engine, group
        self._paths: dict[int, str] = {}  # id(adapter) -> its file, which the followers read themselves

    @classmethod
    def load(cls, path: str, encoders: str | None = None, trusted_keys=None) -> "Leader":
        group, engine = _join(path, encoders, trusted_keys)
        return cls(engine, group)

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, prompts, timings=None, cache_config=None, **kwargs):
        _send(self._group, "generate", dict(kwargs, prompts=prompts,
                                            cache_config=None if cache_config is None else cache_config.to_dict()))
        return self._engine.generate(prompts, timings=timings, cache_config=cache_config, **kwargs)

    def load_adapter(self, path: str):
        _send(self._group, "load_adapter", {"path": path})
        adapter = self._engine.load_adapter(path)
        self._paths[id(adapter)] = path
        return adapter

    def set_adapters(self, adapters):
        _send(self._group, "set_adapters", {"adapters": [[self._paths[id(a)], scale] for a, scale in adapters]})
        return self._engine.set_adapters(adapters)

    def close(self) -> None:
        """Tell the followers to exit, and leave the process group."""
        import torch.distributed as dist

        _send(self._group, STOP, {})
        dist.destroy_process_group()


def follow(path: str, encoders: str | None = None, trusted_keys=None) -> int:
    """A follower's life: join, load, then make each call rank 0 sends until it says stop (exit 0 only then: any
    other end is a failure rank 0's watchdog reports)."""
    import torch.distributed as dist

    from fluxc.runtime.core.cache_config import cache_config_from_dict
    from fluxc.runtime.core.errors import FluxcError

    group, engine = _join(path, encoders, trusted_keys)
    adapters = {}
    while True:
        method, kwargs = _receive(group)
        if method == STOP:
            break
        try:
            if method == "generate":
                kwargs["cache_config"] = (None if kwargs["cache_config"] is None
                                          else cache_config_from_dict(kwargs["cache_config"]))
                engine.generate(kwargs.pop("prompts"), **kwargs)
            elif method == "load_adapter":
                adapters[kwargs["path"]] = engine.load_adapter(kwargs["path"])
            elif method == "set_adapters":
                engine.set_adapters([(adapters[p], scale) for p, scale in kwargs["adapters"]])
        except FluxcError:  # rank 0 makes the same call and answers the client; the ranks go on together
            pass
    dist.destroy_process_group()
    return 0


# ---- starting and watching the followers (in the server process) --------------------------------------------
def _die_with_parent() -> None:
    """In the follower before exec: SIGKILL when the server process ends, however it ends (Linux)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: rank 0 stops them in order


def free_port() -> int:
    """A TCP port free on the loopback interface now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_followers(path: str, world_size: int, encoders: str | None = None, trusted_keys=()) -> list[subprocess.Popen]:
    """Ranks 1..N-1 as processes of this machine, and this process's environment made rank 0's (env:// rendezvous
    on a free loopback port)."""
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world_size),
              "LOCAL_WORLD_SIZE": str(world_size)}
    os.environ.update(common, RANK="0", LOCAL_RANK="0")
    options = [arg for key in trusted_keys for arg in ("--trusted-key", key)] + (["--encoders", encoders] if encoders else [])
    return [subprocess.Popen([sys.executable, "-m", "fluxc.runtime.serve.ranks", path, *options],
                             env=os.environ | {"RANK": str(r), "LOCAL_RANK": str(r)}, preexec_fn=_die_with_parent)
            for r in range(1, world_size)]


def watch(followers: list[subprocess.Popen]) -> None:
    """A daemon thread: if a follower fails (it exits 0 only when rank 0 told it to stop), report it and end the
    server with exit code 1."""

    def run():
        while True:
            time.sleep(0.5)
            for rank, proc in enumerate(followers, start=1):
                if proc.poll() not in (None, 0):
                    print(f"error: rank {rank} of {len(followers) + 1} (pid {proc.pid}) exited with code "
                          f"{proc.returncode}; a context-parallel engine cannot go on without it, so the server "
                          "stops.\n  remedy: see that rank's log above, then start the server again.",
                          file=sys.stderr, flush=True)
                    os._exit(1)  # the GPU thread may be inside a collective with the dead rank: no orderly stop

    threading.Thread(target=run, name="fluxc-ranks", daemon=True).start()


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fluxc.runtime.serve.ranks", description=__doc__.split("\n\n")[0])
    ap.add_argument("engine")
    ap.add_argument("--trusted-key", action="append", default=None)
    ap.add_argument("--encoders", default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level="INFO", format=f"%(levelname)s:     rank {os.environ.get('RANK')}: %(message)s")
    return follow(a.engine, a.encoders, a.trusted_key)


if __name__ == "__main__":
    sys.exit(main())
