"""IR utilities: the verifier and the text dump.

The IR is aten-level torch.fx: placeholders (weights, then activations), `call_function` nodes whose
targets are aten OpOverloads (or operator.getitem), one output node whose meta["names"] names the
outputs. Every node carries `meta["val"]`, the fake tensor with its shape and dtype; weight placeholders
carry meta["weight"], a WeightSource; an activation placeholder's name is the input's name.
"""

import dataclasses
import operator

import torch

from fluxc.runtime.ops.kernels import E4M3_MAX  # noqa: F401  (re-exported: the passes take it from here)

_DTYPE_SHORT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64",
                torch.int64: "i64", torch.int32: "i32", torch.bool: "bool", torch.float8_e4m3fn: "f8e4m3",
                torch.uint8: "u8", torch.float4_e2m1fn_x2: "f4e2m1x2"}


AMAX_SUFFIX = ":act_amax"  # a checkpoint entry f"{linear}.weight{AMAX_SUFFIX}": that linear's calibrated input amax


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """What a weight placeholder holds, relative to its layer's state-dict prefix (placeholder meta["weight"]).

    op "load": the checkpoint tensor `name` (of `shape`, recorded by the trace: adapters and refits check against
    it); "cat": `sources` concatenated along `dim`; "slice": rows
    [start, stop) of `sources[0]` along `dim`; any other op is a weight format (fp8, nvfp4, static scales ...)
    made by its entry in fluxc.passes.weight_formats.FORMATS. Passes that rewrite weights (fused QKV, split
    projections, quantization) say here how to make the new tensor; the build makes it once per layer and
    writes it to the engine."""

    name: str
    op: str = "load"
    sources: tuple["WeightSource", ...] = ()
    dim: int = 0
    start: int = 0
    stop: int = 0
    shape: tuple[int, ...] = ()

    @classmethod
    def cat(cls, sources, dim: int = 0) -> "WeightSource":
        return cls(f"cat{dim}({','.join(s.name for s in sources)})", "cat", tuple(sources), dim)

    @classmethod
    def slice(cls, source, dim: int, start: int, stop: int) -> "WeightSource":
        return cls(f"{source.name}[{dim}:{start}:{stop}]", "slice", (source,), dim, start, stop)

    def checkpoint_names(self) -> list[str]:
        """The checkpoint tensors this one is made from."""
        return [self.name] if self.op == "load" else [n for s in self.sources for n in s.checkpoint_names()]

    def make(self, tensors, formats: dict) -> torch.Tensor:
        """The tensor, from `tensors` (name -> tensor: the checkpoint, or a plan's weights, which hold made
        tensors under their names too). Ops other than load / cat / slice are weight formats, made by
        formats[op](source, parts, tensors) (fluxc.passes.weight_formats.FORMATS, beside the passes that use them)."""
        if self.name in tensors or self.op == "load":
            return tensors[self.name]
        parts = [s.make(tensors, formats) for s in self.sources]
        if self.op == "cat":
            return torch.cat(parts, self.dim)
        if self.op == "slice":
            return parts[0].narrow(self.dim, self.start, self.stop - self.start).contiguous()
        if self.op not in formats:
            raise IRError(f"weight {self.name}: no weight format makes op '{self.op}'")
        return formats[self.op](self, parts, tensors)


def weight_placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder" and "weight" in n.meta]


def output_names(gm: torch.fx.GraphModule) -> list[str]:
    """The names of a graph's outputs (the output node's meta["names"], set by the trace, kept by the passes)."""
    return list(gm.graph.output_node().meta["names"])


class IRError(AssertionError):
    """A graph broke an IR invariant: a compiler bug, never a user error."""


def verify(gm: torch.fx.GraphModule, where: str = "") -> None:
    """Raise IRError naming the first offending node."""
    graph = gm.graph
    try:
        graph.lint()
    except Exception as e:
        raise IRError(f"{where}: fx lint failed: {e}") from e
    seen_compute = seen_activation = False
    outputs = [n for n in graph.nodes if n.op == "output"]
    if len(outputs) != 1:
        raise IRError(f"{where}: expected one output node, found {len(outputs)}")
    names = outputs[0].meta.get("names")
    if names is None or len(names) != len(outputs[0].args[0]):
        raise IRError(f"{where}: the output node's meta['names'] does not name its {len(outputs[0].args[0])} outputs")
    mutated_inputs = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if seen_compute:
                raise IRError(f"{where}: placeholder {node.name} after compute nodes")
            if "weight" in node.meta and seen_activation:
                raise IRError(f"{where}: weight {node.name} after an activation input")
            seen_activation = seen_activation or "weight" not in node.meta
        elif node.op == "call_function":
            seen_compute = True
            if not (isinstance(node.target, torch._ops.OpOverload) or node.target is operator.getitem):
                raise IRError(f"{where}: {node.name} calls {node.target}, not an aten op")
            if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
                mutated_inputs.update(a.name for a in node.args if isinstance(a, torch.fx.Node) and a.op == "placeholder")
        elif node.op != "output":
            raise IRError(f"{where}: node {node.name} has op {node.op}; the IR allows no modules or attributes")
        # multi-output kernels (flash attention) leave unused tuple slots without a value
        unused_slot = node.target is operator.getitem and not node.users
        if node.op != "output" and "val" not in node.meta and not unused_slot:
            raise IRError(f"{where}: node {node.name} has no meta['val'] (shape/dtype)")
    if mutated_inputs:
        raise IRError(f"{where}: graph mutates its inputs {sorted(mutated_inputs)}")


def _describe(val) -> str:
    if isinstance(val, torch.Tensor):
        return f"{_DTYPE_SHORT.get(val.dtype, str(val.dtype))}{list(val.shape)}"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(_describe(v) for v in val) + ")"
    return type(val).__name__


def _arg(a) -> str:
    if isinstance(a, torch.fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_arg(x) for x in a) + "]"
    return repr(a)


def dump(gm: torch.fx.GraphModule, title: str = "") -> str:
    """One line per node: `%name: dtype[shape] = aten.op(args)`; stable across runs, so builds diff."""
    lines = [f"graph {title}"] if title else []
    for node in gm.graph.nodes:
        val = _describe(node.meta.get("val"))
        if node.op == "placeholder":
            lines.append(f"  %{node.name}: {val} = input")
        elif node.op == "output":
            lines.append(f"  return {_arg(node.args[0])}")
        else:
            target = "getitem" if node.target is operator.getitem else str(node.target).removesuffix(".default")
            args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
            lines.append(f"  %{node.name}: {val} = {target}({', '.join(args)})")
    return "\n".join(lines) + "\n"


def op_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            key = "getitem" if node.target is operator.getitem else str(node.target)
            counts[key] = counts.get(key, 0) + 1
    return counts


# ---- serialization (portable plans: compiler/plan.py) -------------------------------------------------
def to_json(gm: torch.fx.GraphModule) -> dict:
    """The graph as JSON: nodes in order with their targets and arguments; placeholders with shape, dtype and
    WeightSource. Fake values are not stored: from_json propagates them again from the placeholders."""
    nodes = []
    for node in gm.graph.nodes:
        entry = {"name": node.name, "op": node.op}
        if node.op == "placeholder":
            v = node.meta["val"]
            entry |= {"target": node.target, "shape": list(v.shape), "stride": list(v.stride()),
                      "dtype": _encode(v.dtype)}
            if "weight" in node.meta:
                entry["weight"] = dataclasses.asdict(node.meta["weight"])
        elif node.op == "call_function":
            entry |= {"target": "getitem" if node.target is operator.getitem else str(node.target),
                      "args": _encode(node.args), "kwargs": {k: _encode(v) for k, v in node.kwargs.items()}}
        else:
            entry |= {"args": _encode(node.args), "names": list(node.meta["names"])}
        nodes.append(entry)
    return {"nodes": nodes}


def from_json(data: dict, device: torch.device) -> torch.fx.GraphModule:
    """The graph to_json wrote, with its tensors (and device arguments other than the CPU) on `device`."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    graph, env, fakes = torch.fx.Graph(), {}, []
    mode = FakeTensorMode()
    for entry in data["nodes"]:
        op, name = entry["op"], entry["name"]
        if op == "placeholder":
            node = graph.create_node("placeholder", entry["target"], name=name)
            if "weight" in entry:
                node.meta["weight"] = _weight_source(entry["weight"])
            with mode:
                fakes.append(torch.empty_strided(entry["shape"], entry["stride"], dtype=_decode(entry["dtype"], env, device),
                                                 device=device))
        elif op == "call_function":
            target = operator.getitem if entry["target"] == "getitem" else _op(entry["target"])
            node = graph.create_node(op, target, _decode(entry["args"], env, device),
                                     {k: _decode(v, env, device) for k, v in entry["kwargs"].items()}, name=name)
        else:
            node = graph.output(_decode(entry["args"], env, device)[0])
            node.meta["names"] = entry["names"]
        env[name] = node
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    return gm


def _op(name: str) -> torch._ops.OpOverload:
    namespace, packet, overload = name.split(".")
    try:
        return getattr(getattr(getattr(torch.ops, namespace), packet), overload)
    except AttributeError:
        raise IRError(f"unknown operator {name} (a plan from another fluxc or torch version?)") from None


def _weight_source(d: dict) -> WeightSource:
    return WeightSource(**(d | {"sources": tuple(_weight_source(s) for s in d["sources"]),
                                "shape": tuple(d["shape"])}))


_SCALAR_TYPES = {"dtype": torch.dtype, "memory_format": torch.memory_format, "layout": torch.layout}


def _encode(a):
    if isinstance(a, torch.fx.Node):
        return {"node": a.name}
    if isinstance(a, tuple):
        return {"tuple": [_encode(x) for x in a]}
    if isinstance(a, list):
        return [_encode(x) for x in a]
    if isinstance(a, torch.device):
        return {"device": a.type}
    for key, kind in _SCALAR_TYPES.items():
        if isinstance(a, kind):
            return {key: str(a).removeprefix("torch.")}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    raise IRError(f"cannot serialize argument {a!r} of type {type(a).__name__}")


def _decode(a, env: dict, device: torch.device):
    if isinstance(a, list):
        return [_decode(x, env, device) for x in a]
    if not isinstance(a, dict):
        return a
    (key, value), = a.items()
    if key == "node":
        return env[value]
    if key == "tuple":
        return tuple(_decode(x, env, device) for x in value)
    if key == "device":
        return torch.device("cpu") if value == "cpu" else device
    return getattr(torch, value)  # dtype, memory_format, layout
