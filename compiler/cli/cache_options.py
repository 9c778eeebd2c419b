"""The step-skipping options `fluxc build` (the engine's default policy) and `fluxc run` (overrides) share."""

import click

from fluxc.runtime.core.cache_config import POLICIES


def cache_options(command):
    """--cache, --cache-threshold, --cache-warmup-steps, --cache-max-consecutive-skips (runtime/cache.py)."""
    options = [
        click.option("--cache", "cache_policy", type=click.Choice(POLICIES), default=None,
                     help="Step skipping: First Block Cache, TeaCache or none (build default: none)."),
        click.option("--cache-threshold", type=float, default=None,
                     help="Skip while the probe's distance stays below this (default 0.05 fbcache, 0.25 teacache)."),
        click.option("--cache-warmup-steps", type=int, default=None, help="Steps that always run first (default 0)."),
        click.option("--cache-max-consecutive-skips", type=int, default=None,
                     help="After this many skips in a row, run a step (default: no limit)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def cache_overrides(cache_policy, cache_threshold, cache_warmup_steps, cache_max_consecutive_skips, **extra) -> dict:
    """The CacheConfig fields the options set (None: left as the engine or recipe has it)."""
    fields = dict(policy=cache_policy, threshold=cache_threshold, warmup_steps=cache_warmup_steps,
                  max_consecutive_skips=cache_max_consecutive_skips, **extra)
    return {k: v for k, v in fields.items() if v is not None}
