"""Step-skipping settings, shared by the recipes (an engine's default policy), the CLI and the runtime loop
(runtime/cache.py decides on the GPU). Imports no torch: `fluxc --help` and the recipes stay light."""

import dataclasses

from fluxc.runtime.core.errors import FluxcError

POLICIES = ("none", "fbcache", "teacache")
PROBE_SUFFIX = "_probe"  # kind suffix of the TeaCache probe segment split off the double block
PROBE_OUTPUT = "cache_modulated"  # its output (passes/insert_cache_points.py)
DEFAULT_THRESHOLD = {"fbcache": 0.05,  # diffusers' FirstBlockCacheConfig default
                     "teacache": 0.25}  # the TeaCache authors' FLUX setting for ~1.5x (0.4: 1.8x, 0.6: 2.0x, 0.8: 2.25x)

@dataclasses.dataclass(frozen=True)
class CacheConfig:
    policy: str = "none"
    threshold: float | None = None  # None: the policy's default
    warmup_steps: int = 0
    max_consecutive_skips: int | None = None  # None: unlimited
    schedule: tuple[int, ...] | None = None  # forced: exactly these steps skip (for measurement)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise FluxcError(f"Unknown cache policy '{self.policy}'.", "Use one of: " + ", ".join(POLICIES) + ".")
        if self.threshold is not None and not (self.threshold >= 0 and self.threshold < float("inf")):
            raise FluxcError(f"The cache threshold must be a finite number >= 0, got {self.threshold!r}.",
                             "Use e.g. --cache-threshold 0.05 (fbcache) or 0.25 (teacache).")
        if self.warmup_steps < 0 or (self.max_consecutive_skips is not None and self.max_consecutive_skips < 1):
            raise FluxcError("--cache-warmup-steps must be >= 0 and --cache-max-consecutive-skips >= 1.",
                             "Leave them out for the policy's defaults (no warm-up, no limit).")

    @property
    def on(self) -> bool:
        return self.policy != "none"

    @property
    def limit(self) -> float:
        return self.threshold if self.threshold is not None else DEFAULT_THRESHOLD.get(self.policy, 0.0)

    def with_overrides(self, **overrides) -> "CacheConfig":
        """This config with the given fields replaced (None leaves a field as is)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["schedule"] = None if self.schedule is None else list(self.schedule)
        return d


def cache_config_from_dict(d: dict | None) -> CacheConfig:
    d = dict(d or {})
    if d.get("schedule") is not None:
        d["schedule"] = tuple(d["schedule"])
    return CacheConfig(**{k: v for k, v in d.items() if k in CacheConfig.__dataclass_fields__})


def parse_schedule(text: str | None) -> tuple[int, ...] | None:
    """'3,5,7' -> (3, 5, 7): the steps a forced schedule skips."""
    if text is None:
        return None
    try:
        return tuple(sorted({int(s) for s in text.split(",") if s.strip()}))
    except ValueError:
        raise FluxcError(f"--cache-schedule takes step numbers separated by commas, got '{text}'.",
                         "Use e.g. --cache-schedule 2,4,6 (step 0 is the first).") from None


def check_schedule(schedule: tuple[int, ...], steps: int) -> None:
    bad = [s for s in schedule if not 0 < s < steps]
    if bad:
        raise FluxcError(f"--cache-schedule cannot skip step(s) {bad} of {steps}: step 0 has no cached "
                         "residual yet, and steps run 0 to steps-1.", f"Use steps 1 to {steps - 1}.")
