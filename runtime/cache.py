"""Step skipping: First Block Cache and TeaCache, decided on the GPU.

Both policies cut the block stack after the first double block's input (TeaCache) or output (FBCache),
look at a probe there, and either run the rest of the stack or add the residual the rest of the stack
made at the last step that ran it (the "tail residual"). The engine's manifest records the cut and the
probes (passes/insert_cache_points.py); the state lives in the runtime loop as device tensors.

FBCache, with the semantics of diffusers' FirstBlockCacheConfig(threshold) (hooks/first_block_cache.py):
    probe r = first block's output hidden_states - its input hidden_states          [B, S, C]
    skip   iff not (mean|r - r_prev| / mean|r_prev| > threshold), where r_prev is the probe of the last
           step that ran the whole stack (never at the first step: there is no r_prev yet)
    skipped step: hidden_states = first block's output + tail residual
TeaCache, as the TeaCache authors' TeaCache4FLUX (github.com/ali-vilab/TeaCache, teacache_flux.py):
    probe m = first block's AdaLN-modulated image input                               [B, S, C]
    acc += poly(mean|m - m_prev| / mean|m_prev|), m_prev being the previous step's probe; skip iff
    acc < threshold, else run the stack and reset acc to 0. The first and the last step always run.
    skipped step: hidden_states = head's hidden_states + tail residual (the first block does not run)
Both, as fluxc's knobs: the first `warmup_steps` steps always run; after `max_consecutive_skips` skips in
a row the next step runs. A forced schedule (`schedule`, for measuring the mechanism) replaces the
decision: exactly the listed steps skip.

The settings (CacheConfig, the policies and their default thresholds) are in core/cache_config.py.
The decision is a handful of scalar ops on the device, and the step's CUDA graph branches on its flag
(runtime/loop.py): a cached loop has no host sync on one GPU.
"""

import torch

from fluxc.runtime.core.cache_config import CacheConfig, check_schedule

# TeaCache4FLUX's rescaling polynomial of the relative L1 distance, highest power first (numpy.poly1d order)
TEACACHE_FLUX_COEFFICIENTS = (4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01)
# per-step modes, decided on the host before the loop
RUN, DECIDE, SKIP = 0.0, 1.0, 2.0


def step_modes(config: CacheConfig, steps: int) -> torch.Tensor:
    """[steps] f32: RUN, DECIDE or SKIP per step."""
    if config.schedule is not None:
        check_schedule(config.schedule, steps)
        return torch.tensor([SKIP if i in config.schedule else RUN for i in range(steps)])
    modes = torch.full((steps,), DECIDE)
    modes[:max(1, config.warmup_steps)] = RUN  # step 0: nothing cached yet
    if config.policy == "teacache":
        modes[-1] = RUN
    return modes


def relative_l1(probe: torch.Tensor, prev: torch.Tensor, all_reduce=None) -> torch.Tensor:
    """mean|probe - prev| / mean|prev| in fp32, a 0-d tensor (NaN before there is a prev). all_reduce(t), if
    given, sums t in place over the ranks that hold the other tokens (a context-parallel run)."""
    p, q = probe.float(), prev.float()
    sums = torch.stack([(p - q).abs().sum(), q.abs().sum()])  # the same count on both sides: a ratio of means
    if all_reduce is not None:
        all_reduce(sums)
    return sums[0] / sums[1]


def decide(config: CacheConfig, state: dict, probe: torch.Tensor, all_reduce=None) -> None:
    """Set state["cache_skip"] (0-d bool) for this step and update the policy's running state, on the device.
    state: cache_mode (this step's RUN/DECIDE/SKIP), cache_prev (last probe compared against),
    cache_acc (TeaCache's accumulated distance), cache_run (skips in a row). all_reduce: see relative_l1;
    with it every rank reaches the same decision."""
    distance = relative_l1(probe, state["cache_prev"], all_reduce)
    if config.policy == "teacache":
        acc = state["cache_acc"] + _poly(TEACACHE_FLUX_COEFFICIENTS, distance)
        wanted = acc < config.limit
    else:
        wanted = ~(distance > config.limit)  # as diffusers: skip unless the distance exceeds the threshold
    if config.max_consecutive_skips is not None:
        wanted = wanted & (state["cache_run"] < config.max_consecutive_skips)
    mode = state["cache_mode"]
    skip = (mode == SKIP) | ((mode == DECIDE) & wanted)
    state["cache_skip"].copy_(skip)
    state["cache_run"].copy_(torch.where(skip, state["cache_run"] + 1, 0))
    if config.policy == "teacache":
        state["cache_acc"].copy_(torch.where(skip, acc, 0))
        state["cache_prev"].copy_(probe)  # TeaCache compares consecutive steps; FBCache updates after a full run


def _poly(coefficients, x: torch.Tensor) -> torch.Tensor:
    y = torch.zeros_like(x)
    for c in coefficients:  # Horner, highest power first
        y = y * x + c
    return y


def initial_state(like: torch.Tensor) -> dict[str, torch.Tensor]:
    """The cache state buffers for a loop over activations shaped like `like` [B, S, C]."""
    scalar = dict(device=like.device, dtype=torch.float32)
    return {
        "cache_prev": torch.zeros_like(like),  # the probe the next decision compares against
        "cache_tail": torch.zeros_like(like),  # the rest of the stack's residual at the last full step
        "cache_acc": torch.zeros((), **scalar),
        "cache_run": torch.zeros((), **scalar),
        "cache_skip": torch.zeros((), device=like.device, dtype=torch.bool),
    }
