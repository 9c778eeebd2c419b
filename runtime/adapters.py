"""LoRA adapters on a loaded engine: weights are data, so an adapter changes buffers, never code.

An adapter file (`NAME.fluxa`, written by `fluxc adapter` from the formats people publish) is one safetensors
file: for every linear it changes, by the diffusers module name of the model (`transformer_blocks.0.attn.to_q`),
the factors `{module}.down` A [r, K] and `{module}.up` B [N, r] with the adapter's alpha / r folded into B, so
that the linear's weight becomes W + scale * B @ A. Its metadata holds the manifest (family, source, rank) and
the BLAKE3 digest of the manifest and every tensor's bytes, checked before anything is used.

The engine's manifest says how each of its weight tensors is made from the checkpoint's (the WeightSource trees
of fluxc.ir: fused QKV is a cat, fuse_epilogues' split a slice, quantized tensors a format over those). Setting
adapters [(A1, s1), (A2, s2), ...] makes every tensor that reads an adapted linear again, from its base:
    plain (fp32 / bf16)  W' = W + sum_i s_i B_i A_i       (cat / slice applied to the deltas as to the weights)
    fp8                  W' = Q8(deq(W8) + delta): e4m3 with a fresh per-row scale (as the build quantizes)
    nvfp4                W' = Q4(deq(W4) + delta): fresh block scales and global scale (and their swizzled layout)
and copies it into the same buffer, so the captured CUDA graphs keep running. Quantized engines merge then
re-quantize: no per-step cost and no recompile, at the price of a second rounding of the base weight (the
contract: the adapted engine keeps its precision's floor against diffusers bf16 with the adapter; README
"LoRA adapters"). A tensor's base is copied aside on the device the first time an adapter changes it; removing
every adapter copies the bases back, bit for bit, and frees them.
"""

import dataclasses
import json
import math
import os

import blake3
import torch

from fluxc.runtime.core.errors import FluxcError
from fluxc.runtime.core.families import ENCODER_KINDS
from fluxc.runtime.ops import nvfp4
from fluxc.runtime.ops.kernels import quantize_rows

ADAPTER_FORMAT = 1
REMAKE = "Write the adapter again with `fluxc adapter ENGINE LORA.safetensors -o NAME.fluxa`."
FP8_OPS = ("fp8", "fp8_scale")
NVFP4_OPS = ("nvfp4", "nvfp4_scale", "nvfp4_global", "nvfp4_swizzled")
# formats made from calibration data or norm weights, never from a linear's values: an adapter leaves them as built
STATIC_OPS = ("act_scale", "act_global", "rms_fp8_scale")


@dataclasses.dataclass
class Adapter:
    """One adapter file: module -> (down [r, K], up [N, r], alpha / r folded into up), and its manifest."""

    name: str
    manifest: dict
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def family(self) -> str:
        return self.manifest["family"]


def _digest(manifest_text: str, tensors: dict[str, torch.Tensor]) -> str:
    h = blake3.blake3(manifest_text.encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy() if tensors[name].numel() else b"")
    return h.hexdigest()


def write_adapter(path: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], manifest: dict) -> str:
    """Write an adapter file atomically; returns its digest."""
    from safetensors.torch import save_file

    from fluxc.runtime.core.bundle import save_atomically

    tensors = {}
    for module, (down, up) in factors.items():
        # clones: converters share one down factor between q, k and v, and safetensors refuses shared storage
        tensors[f"{module}.down"], tensors[f"{module}.up"] = down.detach().cpu().clone(), up.detach().cpu().clone()
    text = json.dumps({"format": "fluxc-adapter", "format_version": ADAPTER_FORMAT} | manifest, sort_keys=True)
    digest = _digest(text, tensors)
    save_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={"fluxc_adapter": text, "digest": digest}))
    return digest


def read_adapter(path: str) -> Adapter:
    """The adapter at `path`, after checking its format and digest; FluxcError if it is not one or was changed."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise FluxcError(f"No adapter file at '{path}'.", REMAKE)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise FluxcError(f"'{path}' is not a readable safetensors file ({e}).", REMAKE) from None
    text = meta.get("fluxc_adapter")
    if text is None:
        raise FluxcError(f"'{path}' is a safetensors file but not a fluxc adapter (a LoRA as published?).",
                         "Convert it for the engine first: " + REMAKE.removeprefix("Write the adapter again with ")
                         .removesuffix("."))
    if meta.get("digest") != _digest(text, tensors):
        raise FluxcError(f"Adapter '{path}' does not match its digest (changed or corrupt).", REMAKE)
    manifest = json.loads(text)
    if manifest.get("format_version") != ADAPTER_FORMAT:
        raise FluxcError(f"Adapter '{path}' has format {manifest.get('format_version')!r}; this fluxc reads "
                         f"{ADAPTER_FORMAT}.", REMAKE)
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
    factors = {m: (tensors[f"{m}.down"], tensors[f"{m}.up"]) for m in modules}
    name = os.path.basename(path).removesuffix(".fluxa")
    return Adapter(name, manifest, factors)


# ---- the engine's weights as trees of checkpoint tensors -------------------------------------------------------
def _leaves(tree: dict):
    if tree["op"] == "load":
        yield tree
    for s in tree["sources"]:
        yield from _leaves(s)


def _shape(tree: dict) -> list[int]:
    """The shape of a load / cat / slice tree's value."""
    if tree["op"] == "load":
        return list(tree["shape"])
    shapes = [_shape(s) for s in tree["sources"]]
    out, d = list(shapes[0]), tree["dim"]
    out[d] = sum(s[d] for s in shapes) if tree["op"] == "cat" else tree["stop"] - tree["start"]
    return out


def _module(prefix: str, leaf: dict) -> str | None:
    """The diffusers module name of a checkpoint linear's weight (None for other tensors: biases, norms)."""
    name = leaf["name"]
    return prefix + name.removesuffix(".weight") if name.endswith(".weight") and len(leaf["shape"]) == 2 else None


@dataclasses.dataclass
class _Tensor:
    """One engine weight: its source tree, and every loaded copy (segments of different kinds may hold their own)."""

    tree: dict
    prefix: str
    copies: list[torch.Tensor]


def engine_linears(manifest: dict) -> dict[str, list[int]]:
    """Every checkpoint linear the engine's transformer weights are made from: module -> its weight's shape [N, K]."""
    linears = {}
    for seg in manifest["segments"]:
        if seg["kind"] in ENCODER_KINDS or seg["kind"].startswith("vae"):
            continue
        for layer in seg["layers"]:
            prefix = f"{layer}." if layer else ""
            for tree in seg["weight_sources"]:
                for leaf in _leaves(tree):
                    module = _module(prefix, leaf)
                    if module is not None:
                        linears[module] = leaf["shape"]
    return linears


def check_adapter(adapter: Adapter, family: str, linears: dict[str, list[int]]) -> None:
    """FluxcError unless the adapter is for this family and every linear it changes is one of `linears`, same shape."""
    if adapter.family != family:
        raise FluxcError(f"Adapter {adapter.name} is for {adapter.family}; this engine is {family}.",
                         f"Use an adapter made for a {family} model.")
    for module, (down, up) in adapter.factors.items():
        if module not in linears:
            raise FluxcError(f"Adapter {adapter.name} changes {module}, which this engine does not have.",
                             "Use an adapter made for this model's architecture.")
        want = linears[module]
        if [up.shape[0], down.shape[1]] != want or up.shape[1] != down.shape[0]:
            raise FluxcError(f"Adapter {adapter.name} changes {module} as [{up.shape[0]}, {down.shape[1]}] "
                             f"(rank {down.shape[0]}); the engine's weight is {want}.",
                             "Use an adapter made for this model's architecture.")


class AdapterSlots:
    """The engine weights adapters can change, and the bases of the ones they have changed (Engine.set_adapters)."""

    def __init__(self, manifest: dict, weights: dict[str, list[torch.Tensor]]):
        self.tensors: dict[str, _Tensor] = {}
        for seg in manifest["segments"]:
            key = f"{seg['kind']}:"
            for layer in seg["layers"]:
                prefix = f"{layer}." if layer else ""
                loaded = weights.get(key + layer)
                if loaded is None:
                    continue
                for tree, t in zip(seg["weight_sources"], loaded):
                    entry = self.tensors.setdefault(prefix + tree["name"], _Tensor(tree, prefix, []))
                    if not any(c is t for c in entry.copies):
                        entry.copies.append(t)
        self.base: dict[str, torch.Tensor] = {}
        self.active: list[tuple[Adapter, float]] = []

    def apply(self, adapters: list[tuple[Adapter, float]], device: torch.device) -> int:
        """Make every tensor the adapters change from its base, restore the others; returns how many were written."""
        scaled: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        for adapter, scale in adapters:
            for module, (down, up) in adapter.factors.items():
                scaled.setdefault(module, []).append((down, up, scale))

        def delta(prefix: str, tree: dict) -> torch.Tensor | None:
            """The change of a load / cat / slice tree's value (f32 on the device), None where nothing changes."""
            if tree["op"] == "load":
                terms = scaled.get(_module(prefix, tree))
                if not terms:
                    return None
                return sum(s * (up.to(device, torch.float32) @ down.to(device, torch.float32)) for down, up, s in terms)
            parts = [delta(prefix, s) for s in tree["sources"]]
            if all(p is None for p in parts):
                return None
            if tree["op"] == "slice":
                return parts[0].narrow(tree["dim"], tree["start"], tree["stop"] - tree["start"])
            return torch.cat([p if p is not None else torch.zeros(_shape(s), device=device)  # cat
                              for p, s in zip(parts, tree["sources"])], tree["dim"])

        changed = {}
        for name, entry in self.tensors.items():
            if any(scaled.get(_module(entry.prefix, leaf)) for leaf in _leaves(entry.tree)):
                changed[name] = entry
        groups = _formats(changed)  # a format this runtime cannot remake fails here, before any write
        for name in [n for n in self.base if n not in changed]:
            self._write(name, self.base.pop(name))
        written = 0
        for kind, inner, group in groups:
            d = delta(next(iter(group.values())).prefix, inner)
            bases = {op: self._base(_name(e)) for op, e in group.items()}
            for op, value in _remake(kind, bases, d).items():
                self._write(_name(group[op]), value)
                written += 1
        self.active = list(adapters)
        return written

    def _base(self, name: str) -> torch.Tensor:
        if name not in self.base:
            self.base[name] = self.tensors[name].copies[0].clone()
        return self.base[name]

    def _write(self, name: str, value: torch.Tensor) -> None:
        for t in self.tensors[name].copies:
            t.copy_(value)


def _name(entry: _Tensor) -> str:
    return entry.prefix + entry.tree["name"]


def _formats(changed: dict[str, _Tensor]) -> list[tuple[str, dict, dict[str, _Tensor]]]:
    """The changed tensors grouped by what is remade together: [(kind, the inner load / cat / slice tree, {op: tensor})].
    Kinds: "plain" (the tree itself), "fp8" (the e4m3 weight and its scales), "nvfp4" (codes, block scales, global,
    swizzled scales). Static formats (calibrated activation scales, norm-weight bounds) are left as built."""
    groups: dict[str, tuple[str, dict, dict[str, _Tensor]]] = {}
    for entry in changed.values():
        op = entry.tree["op"]
        if op in STATIC_OPS:
            continue
        inner = entry.tree
        while inner["op"] not in ("load", "cat", "slice"):
            if inner["op"] not in FP8_OPS + NVFP4_OPS:
                raise FluxcError(f"An adapter changes {_name(entry)} (format {inner['op']}), which this runtime "
                                 "cannot remake.", "Use an engine of a supported precision (fp32, bf16, fp8, nvfp4).")
            inner = inner["sources"][0]
        kind = "plain" if inner is entry.tree else "fp8" if op in FP8_OPS else "nvfp4"
        key = entry.prefix + json.dumps(inner, sort_keys=True)
        groups.setdefault(key, (kind, inner, {}))[2][op if kind != "plain" else "plain"] = entry
    return list(groups.values())


def _remake(kind: str, bases: dict[str, torch.Tensor], delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """The group's tensors for base + delta, in their formats."""
    if kind == "plain":
        base = bases["plain"]
        return {"plain": (base.float() + delta).to(base.dtype)}
    if kind == "fp8":
        codes, scale = bases["fp8"], bases["fp8_scale"]
        weight, scale = quantize_rows(codes.float() * scale + delta)
        return {"fp8": weight, "fp8_scale": scale}
    codes, global_ = bases["nvfp4"], bases["nvfp4_global"]
    scales = bases.get("nvfp4_scale")
    if scales is None:  # a native engine keeps the block scales in cuBLASLt's layout only
        scales = nvfp4.unswizzle_scales(bases["nvfp4_swizzled"], codes.shape[0], codes.shape[1] * 2 // nvfp4.BLOCK)
    made = dict(zip(("nvfp4", "nvfp4_scale", "nvfp4_global"),
                    nvfp4.quantize_weight(nvfp4.dequantize(codes, scales) * global_ + delta)))
    if "nvfp4_swizzled" in bases:
        made["nvfp4_swizzled"] = nvfp4.swizzle_scales(made["nvfp4_scale"])
    return {op: made[op] for op in bases}
