"""`python -m fluxc.runtime ENGINE --prompt ... -o out.png`: prompts to images with the runtime alone (no CLI, no
compiler). Under your own launcher it runs every rank of a context-parallel engine:

    torchrun --nproc-per-node N -m fluxc.runtime ENGINE --prompt "a cat" -o cat.png

Each rank joins the process group torchrun set up, the ranks generate together, and rank 0 alone writes the
images and prints one line. `fluxc run` is the full command (embeddings, cache reports, launching ranks itself).
"""

import argparse
import os
import sys

from fluxc.runtime.core.errors import FluxcError


def _arguments(argv):
    ap = argparse.ArgumentParser(prog="python -m fluxc.runtime", description=__doc__.split("\n\n")[0])
    ap.add_argument("engine")
    ap.add_argument("--prompt", action="append", required=True, help="repeat for several images")
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", choices=["none", "fbcache", "teacache"], default=None)
    ap.add_argument("--cache-threshold", type=float, default=None)
    ap.add_argument("--trusted-key", action="append", default=None,
                    help="Ed25519 public key (PEM); repeat for several; given, the engine must be signed by one")
    ap.add_argument("-o", "--output", required=True, help="image path; several prompts write NAME-000.png, ...")
    return ap.parse_args(argv)


def _paths(output: str, n: int) -> list[str]:
    stem, ext = os.path.splitext(output)
    return [output] if n == 1 else [f"{stem}-{i:03d}{ext}" for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    from fluxc.runtime import Engine, parallel
    from fluxc.runtime.core.bundle import check_writable, save_atomically

    distributed = "WORLD_SIZE" in os.environ  # started by torchrun
    if distributed:
        parallel.init()
    try:
        check_writable(args.output)  # before the work, not after it
        engine = Engine.load(args.engine, trusted_keys=args.trusted_key)
        config = engine.cache_config(policy=args.cache, threshold=args.cache_threshold)
        images = engine.generate(args.prompt, height=args.height, width=args.width, steps=args.steps,
                                 guidance=args.guidance, seed=args.seed, cache_config=config)
        if parallel.rank() == 0:
            paths = _paths(args.output, len(images))
            for image, path in zip(images, paths):
                save_atomically(path, image.save)
            print(f"wrote {len(paths)} image(s): {paths[0]}{' ...' if len(paths) > 1 else ''}")
    except FluxcError as e:
        if parallel.rank() == 0:
            print(f"error: {e.message}" + (f"\n  remedy: {e.remedy}" if e.remedy else ""), file=sys.stderr)
        return 1
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
