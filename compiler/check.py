"""The build's numerics check: each compiled segment against the eager diffusers module it was traced from, on
the segment's example inputs and layer 0's weights, within the recipe's tolerance."""

import torch

from fluxc.frontend.trace import COMPONENT_KINDS
from fluxc.numerics import relative_error
from fluxc.weights import layer_inputs


def _windows(seg) -> list[slice]:
    """The schedule rows each check run takes: for a segment with a hoisted schedule part, the first and the
    last window of its rows (they differ: a hoisted graph that mixed rows fails the check)."""
    if seg.schedule is None:
        return [slice(None)]
    b, n = seg.profile.batch, next(iter(seg.schedule.example.values())).shape[0]
    return [slice(0, b), slice(n - b, n)]


def _run_inputs(seg, window: slice, rows: dict) -> dict:
    return seg.example | {k: v[window] for k, v in rows.items()}


@torch.no_grad()
def eager_outputs(eager_module, seg) -> list[dict[str, torch.Tensor]]:
    """The diffusers module's outputs for each check run (the segment's expected outputs)."""
    names = [k for k in seg.example if seg.schedule is None or k not in seg.schedule.outputs]
    rows = seg.schedule.example if seg.schedule is not None else {}
    runs = []
    for window in _windows(seg):
        acts = _run_inputs(seg, window, rows)
        out = eager_module(*(acts[k] for k in names))
        runs.append(dict(zip(seg.traced_outputs, out if isinstance(out, tuple) else (out,))))
    return runs


@torch.no_grad()
def check_segment(compiled: dict, seg, weights, recipe) -> dict:
    """Compiled segment vs the eager diffusers module it was traced from (seg.expected), on layer 0's weights.
    A segment with a hoisted schedule part runs after that part's compiled graph."""
    layer0 = layer_inputs(seg, weights, seg.layers[0])[:len(seg.weight_names)]
    rows = {}
    if seg.schedule is not None:
        sched = seg.schedule
        rows = sched.example | dict(zip(sched.outputs, compiled[sched.name](*layer_inputs(sched, weights, seg.layers[0]))))
    errors = {}
    for window, expected in zip(_windows(seg), seg.expected):
        acts = _run_inputs(seg, window, rows)
        got = acts | dict(zip(seg.outputs, compiled[seg.name](*layer0, *(acts[k] for k in seg.inputs))))
        for name, want in expected.items():  # a hoisted output (the head's temb) comes from the schedule rows
            errors[name] = max(errors.get(name, 0.0), relative_error(got[name], want))
    worst = max(errors.values())
    rtol = recipe.component_check_rtol if seg.kind in COMPONENT_KINDS and recipe.component_check_rtol else recipe.check_rtol
    if not worst <= rtol:
        raise RuntimeError(f"numerics check failed for {seg.name}: relative errors {errors} exceed {rtol} (compiler bug)")
    return {"max_relative_error": worst, "tolerance": rtol, "by_output": errors}
