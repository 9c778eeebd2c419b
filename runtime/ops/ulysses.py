"""Ulysses attention's ops: attention over every rank's tokens of a context-parallel run (runtime/parallel.py),
through all-to-alls that regroup the heads.

    fluxc.ulysses_send(q, k, v) -> ulysses_attend -> ulysses_receive   q, k, v [B, H, S_local, D] -> [B, H, S_local, D]
        all-to-all: send head group j (H/N heads) to rank j, receive every rank's tokens of my group
                    -> q, k, v [B, H/N, N * S_local, D] (tokens in rank order: [text_0, image_0, text_1, ...])
        attention over all tokens (softmax attention does not care about the keys' order)
        all-to-all back: my tokens of every head group -> [B, H, S_local, D]

With one process (the build's numerics check of an N-rank graph) the steps move each part to where rank j would
find it, in that process's memory: attention over what it is given.
"""

import collections
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fluxc.runtime.ops import kernels


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# Attention over every rank's tokens in three steps, so that shard_attention can put the work that does not depend
# on attention (a single block's MLP) between them, computing while the transfers run on NCCL's stream:
#     got  = ulysses_send(q, k, v)                  start the all-to-alls of q, k, v
#     back = ulysses_attend(got, after, scale)      attention as each part lands; start the all-to-alls back
#     out  = ulysses_receive(back, after)           wait for them: [B, H, S_local, D]
# `after` holds outputs of the work placed before the step: an input it does not read, which keeps the compiler
# from moving that work past it. got and back are buffers of q, k, v's and q's size whose layout depends on the
# world size (below); their declared shapes do not, so an engine's graph is the same at build and at run time.
# ulysses_send_qk is ulysses_send of fluxc.qk_norm_rope's q and k, which its kernel writes straight into the send
# buffer (shard_attention folds the two ops).
# e4m3 (FP8 engines, Recipe.ulysses_e4m3): q, k and v cross as e4m3 with one fp32 scale per (token, head) row of D,
# amax / 448, the scale's 4 bytes after the row's D codes: a uint8 buffer of D + 4 bytes a row, 3/8 fewer bytes on
# the wire than bf16 q, k, v and output (the output goes back in bf16). Attention dequantizes each part as it lands
# and runs in bf16. Numerics: per-row e4m3 of q, k and v; numerics.FP8_WIRE_SQNR_DB holds the attention output
# against float64 attention over the bf16 rows (tests/test_parallel.py).
@torch.library.custom_op("fluxc::ulysses_send", mutates_args=())
def ulysses_send(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, e4m3: bool = False) -> torch.Tensor:
    send, slots = _send_buffer(v, e4m3)
    for slot, x in zip(slots, (q, k, v)):
        _fill(slot, _heads(x), e4m3)
    return _transfer(send)


@torch.library.custom_op("fluxc::ulysses_send_qk", mutates_args=())
def ulysses_send_qk(q_parts: list[torch.Tensor], k_parts: list[torch.Tensor], q_weights: list[torch.Tensor],
                    k_weights: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, eps: float,
                    v: torch.Tensor, e4m3: bool = False) -> torch.Tensor:
    send, (q_slot, k_slot, v_slot) = _send_buffer(v, e4m3)
    kernels.qk_norm_rope_into(q_parts, k_parts, q_weights, k_weights, cos, sin, eps, q_slot, k_slot, e4m3)
    _fill(v_slot, _heads(v), e4m3)
    return _transfer(send)


@torch.library.custom_op("fluxc::ulysses_attend", mutates_args=())
def ulysses_attend(got: torch.Tensor, after: list[torch.Tensor], scale: float | None = None) -> torch.Tensor:
    del after  # ordering only
    return _attend(got, scale)


@torch.library.custom_op("fluxc::ulysses_receive", mutates_args=())
def ulysses_receive(back: torch.Tensor, after: list[torch.Tensor]) -> torch.Tensor:
    del after  # ordering only
    return _receive(back)


def _wire_row(v: torch.Tensor, e4m3: bool) -> tuple[int, torch.dtype]:
    """(elements, dtype) of one (token, head) row on the wire."""
    if e4m3:
        assert v.dtype == torch.bfloat16, f"e4m3 transfers are for bf16 activations (FP8 engines), not {v.dtype}"
        return v.shape[-1] + kernels.ROW_SCALE_BYTES, torch.uint8
    return v.shape[-1], v.dtype


def _got_like(v: torch.Tensor, e4m3: bool) -> torch.Tensor:
    """An empty buffer of what a send returns: [3, B, S, H, row]."""
    b, h, s, _ = v.shape
    row, dtype = _wire_row(v, e4m3)
    return v.new_empty(3, b, s, h, row, dtype=dtype)


def _back_like(got: torch.Tensor) -> torch.Tensor:
    """An empty buffer of what ulysses_attend returns: [B, S, H, D], bf16 where e4m3 rows came in."""
    _, b, s, h, row = got.shape
    if got.dtype == torch.uint8:
        return got.new_empty(b, s, h, row - kernels.ROW_SCALE_BYTES, dtype=torch.bfloat16)
    return got.new_empty(b, s, h, row)


@ulysses_send.register_fake
def _(q, k, v, e4m3=False):
    return _got_like(v, e4m3)


@ulysses_send_qk.register_fake
def _(q_parts, k_parts, q_weights, k_weights, cos, sin, eps, v, e4m3=False):
    return _got_like(v, e4m3)


@ulysses_attend.register_fake
def _(got, after, scale=None):
    return _back_like(got)


@ulysses_receive.register_fake
def _(back, after):
    b, s, h, d = back.shape
    return back.new_empty(b, s, h, d).transpose(1, 2)


# Each rank's head group goes in OVERLAP_CHUNKS parts, so that one part's all-to-alls run (on NCCL's stream)
# while another part's attention computes. Token-major layouts on the wire: what a rank receives is attention's
# input as strided views, and attention's output ([B, S, h, D] in memory) goes back as it is at batch 1: one copy
# in (none for q and k from ulysses_send_qk), one copy out, both kernels.copy_heads (torch's copy of these
# permutations took about twice as long: benchmarks/README.md, copy_heads). Transfers in flight wait in _in_flight,
# oldest first: a segment runs its steps in one thread, in graph order, so each step takes the handles the one
# before queued.
_in_flight: collections.deque = collections.deque()


def _send_buffer(v: torch.Tensor, e4m3: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The send buffer for q, k, v of v's shape [B, H, S, D]: head group j (H/N heads) of each goes to rank j, part by
    part: [part, to rank j, my token, batch, q|k|v, head of j's group, row] (row: D values, or D e4m3 codes and
    their scale's bytes); and its q, k and v slots as [B, S, rank j, part, head, row] views, what _heads makes of a
    [B, H, S, D] tensor."""
    b, h, s, _ = v.shape
    n, chunks, hc = _groups(h)
    row, dtype = _wire_row(v, e4m3)
    send = v.new_empty(chunks, n, s, b, 3, hc, row, dtype=dtype)
    return send, [send[..., i, :, :].permute(3, 2, 1, 0, 4, 5) for i in range(3)]


def _fill(slot: torch.Tensor, x: torch.Tensor, e4m3: bool) -> None:
    """One of q, k, v ([B, S, rank j, part, head, D] views) into its slot of the send buffer."""
    (kernels.quantize_heads if e4m3 else kernels.copy_heads)(slot, x)


def _heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] (stored [B, S, H, D]) as [B, S, rank j, part, head, D]."""
    n, chunks, hc = _groups(x.shape[1])
    return x.transpose(1, 2).unflatten(2, (n, chunks, hc))


def _transfer(send: torch.Tensor) -> torch.Tensor:
    """Start the all-to-all of each part of a filled send buffer. The returned buffer is [3, B, S, H, D] in size; as
    filled, got[c, j] = rank j's tokens of part c of my group: [C, N, S, B, 3, hc, D]."""
    _in_flight.clear()  # nothing is in flight between attentions; a segment cut short by an error left handles
    chunks, n, s, b, _, hc, d = send.shape
    got = send.new_empty(3, b, s, n * chunks * hc, d)
    parts = got.view(send.shape)
    for c in range(chunks):
        _start(parts[c], send[c])
    return got


def _attend(got: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Attention over every rank's tokens (in rank order) for my head group, each part as its transfer lands; each
    part's output starts back to the tokens' ranks. The returned buffer is [B, S, H, D] in size; as filled,
    back[c] = my tokens of every group's part c: [C, N * S, B, hc, D]."""
    _, b, s, h, row = got.shape
    n, chunks, hc = _groups(h)
    e4m3 = got.dtype == torch.uint8
    parts = got.view(chunks, n * s, b, 3, hc, row)
    back = _back_like(got)
    out_parts = back.view(chunks, n * s, b, hc, back.shape[-1])
    for c in range(chunks):
        _finish()
        part = kernels.dequantize_heads(parts[c]) if e4m3 else parts[c]
        q_c, k_c, v_c = part.permute(2, 1, 3, 0, 4)  # [3, B, hc, N * S, D] views
        o = F.scaled_dot_product_attention(q_c, k_c, v_c, scale=scale).permute(2, 0, 1, 3)  # [N * S, B, hc, D]
        _start(out_parts[c], o.contiguous())  # rank j's tokens back to rank j (no copy at batch 1)
    return back


def _receive(back: torch.Tensor) -> torch.Tensor:
    """Wait for my tokens of every group's parts and lay them out as attention's output: [B, H, S, D]."""
    b, s, h, d = back.shape
    n, chunks, hc = _groups(h)
    parts = back.view(chunks, n, s, b, hc, d)
    out = back.new_empty(b, s, h, d)
    out_parts = out.view(b, s, n, chunks, hc, d)
    for c in range(chunks):
        _finish()  # [N, S, B, hc, D] -> [B, S, N, hc, D]
        kernels.copy_heads(out_parts[:, :, :, c:c + 1], parts[c].permute(2, 1, 0, 3, 4).unsqueeze(3))
    return out.transpose(1, 2)


def _groups(heads: int) -> tuple[int, int, int]:
    """(ranks = head groups, parts per group, heads per part): OVERLAP_CHUNKS parts where they divide a group."""
    n = world_size()
    chunks = OVERLAP_CHUNKS if (heads // n) % OVERLAP_CHUNKS == 0 else 1
    return n, chunks, heads // (n * chunks)


def _start(got: torch.Tensor, send: torch.Tensor) -> None:
    """Start an all-to-all of send's N equal slices along dim 0 into got (slice j to and from rank j)."""
    if world_size() == 1:  # one process holding every rank's tokens: the build's check of an N-rank graph
        got.copy_(send)
        _in_flight.append(None)
    else:
        _in_flight.append(dist.all_to_all_single(got, send, async_op=True))


def _finish() -> None:
    """Wait (on the current stream) for the oldest transfer in flight."""
    work = _in_flight.popleft()
    if work is not None:
        work.wait()


# Parts per rank's head group (used when they divide it). More parts hide more of the transfers behind attention
# but send smaller messages; FLUXC_ULYSSES_CHUNKS sets it for a process (read at import, so every rank of a
# launch inherits it).
OVERLAP_CHUNKS = int(os.environ.get("FLUXC_ULYSSES_CHUNKS", "2"))

