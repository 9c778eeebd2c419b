"""Damage an engine byte by byte and record what loading and running it does: the child process of
test_trust.test_fuzzed_engines (a crash or a hang there must not take pytest with it).

    python tests/fuzz_engine.py ENGINE OUT.jsonl --mode damage|tamper|signed --cases N --seed S [--trusted-key PUB]

Each case mutates one file in place (a bit flip, an inserted or deleted byte, or a truncation), loads the engine
and generates one image of one step, runs `fluxc inspect` on it, then restores the file. Modes:
    damage   the digests are left alone, as bad luck leaves them; every file, artifacts included
    tamper   the mutated file's digest in the manifest and the seal's digest are rewritten, as someone who can
             write the engine would; the data files only (manifest, seal, tokenizers, weights): a rewritten
             artifact is new code, which only a signature can refuse
    signed   as tamper, every file, artifacts included, loaded with --trusted-key (the engine is signed by it)
Each case appends one JSON line: file, mutation, outcome (same | differs | error | traceback | hang) and the
message. The baseline image comes from the unmodified engine, first.
"""

import argparse
import json
import os
import random
import signal
import sys
import traceback

import blake3
import torch
from click.testing import CliRunner

from fluxc.cli import main as fluxc
from fluxc.runtime import Engine, FluxcError

MANIFEST, SEAL, WEIGHTS = "manifest.json", "seal.json", "weights.safetensors"
CODE = "artifact.bin"


def run(engine: str, keys) -> torch.Tensor:
    return Engine.load(engine, trusted_keys=keys).generate("a red cube", steps=1, seed=3, output_type="pt")


def mutate(data: bytes, rng: random.Random, header_bias: bool) -> tuple[bytes, str]:
    end = len(data)
    if header_bias and rng.random() < 0.7:  # safetensors: the u64 length and the JSON header
        end = min(end, 8 + int.from_bytes(data[:8], "little"))
    at = rng.randrange(max(end, 1))
    kind = rng.choice(["flip", "insert", "delete", "truncate"])
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ rng.randrange(1, 256)]) + data[at + 1:], f"flip@{at}"
    if kind == "insert":
        return data[:at] + bytes([rng.randrange(256)]) + data[at:], f"insert@{at}"
    if kind == "delete":
        return data[:at] + data[at + 1:], f"delete@{at}"
    return data[:at], f"truncate@{at}"


def rehash(engine: str, rel: str) -> None:
    """Rewrite the digests as a tamperer would: the file's in the manifest (when the manifest still parses), then
    the seal's digest of the manifest (keeping its signatures)."""
    manifest, seal = os.path.join(engine, MANIFEST), os.path.join(engine, SEAL)
    if rel not in (MANIFEST, SEAL):
        with open(manifest) as f:
            m = json.load(f)
        with open(os.path.join(engine, rel), "rb") as f:
            m["files"][rel] = blake3.blake3(f.read()).hexdigest()
        with open(manifest, "w") as f:
            json.dump(m, f, indent=1)
    if rel != SEAL:
        with open(seal) as f:
            s = json.load(f)
        with open(manifest, "rb") as f:
            s["digest"] = blake3.blake3(f.read()).hexdigest()
        with open(seal, "w") as f:
            json.dump(s, f)


def case_outcome(args, rel: str, keys, baseline: torch.Tensor) -> dict:
    """Rehash (unless the mode is damage), load and run the mutated engine: its outcome and message."""
    signal.alarm(60)
    try:
        if args.mode != "damage":
            rehash(args.engine, rel)
        image = run(args.engine, keys)
        return {"outcome": "same" if torch.equal(image, baseline) else "differs"}
    except FluxcError as e:
        return {"outcome": "error", "message": str(e)}
    except TimeoutError:
        return {"outcome": "hang"}
    except Exception:
        return {"outcome": "traceback", "message": traceback.format_exc()[-2000:]}
    finally:
        signal.alarm(0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine")
    ap.add_argument("out")
    ap.add_argument("--mode", choices=["damage", "tamper", "signed"], required=True)
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trusted-key", default=None)
    args = ap.parse_args()
    keys = [args.trusted_key] if args.trusted_key else None
    rng = random.Random(args.seed)
    files = sorted(os.path.relpath(os.path.join(d, n), args.engine) for d, _, names in os.walk(args.engine) for n in names)
    if args.mode == "tamper":
        files = [f for f in files if not f.endswith(CODE)]
    baseline = run(args.engine, keys)
    originals = {rel: open(os.path.join(args.engine, rel), "rb").read() for rel in files}

    def alarm(*_):
        raise TimeoutError

    signal.signal(signal.SIGALRM, alarm)
    with open(args.out, "w") as out:
        for case in range(args.cases):
            rel = files[case % len(files)]  # every file in turn, the mutation at random
            data, how = mutate(originals[rel], rng, rel == WEIGHTS)
            with open(os.path.join(args.engine, rel), "wb") as f:
                f.write(data)
            record = {"case": case, "file": rel, "mutation": how}
            try:
                record |= case_outcome(args, rel, keys, baseline)
                inspected = CliRunner().invoke(fluxc, ["inspect", args.engine])  # a FluxcError exits 1, a bug raises
                if inspected.exception is not None and not isinstance(inspected.exception, SystemExit):
                    record |= {"outcome": "traceback", "message": "fluxc inspect: " + repr(inspected.exception)}
            finally:
                for name in {rel, MANIFEST, SEAL}:
                    with open(os.path.join(args.engine, name), "wb") as f:
                        f.write(originals[name])
            out.write(json.dumps(record) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
