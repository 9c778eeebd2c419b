"""The import structure as installed (`fluxc.*` names): the runtime stands alone, and nothing imports in a circle.

The first test imports each fluxc.runtime module in a fresh interpreter and looks at sys.modules afterwards, so
it sees what really gets imported (package __init__ files included), not what the source seems to say. The
second walks every module's import statements (function-level ones too) over the installed names.
"""

import ast
import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
import tomllib

import pytest

FORBIDDEN = ("diffusers", "transformers", "onnxscript", "matplotlib", "fluxc.cli")


def _installed_modules() -> dict[str, str]:
    """{module name: source file} of every fluxc module: the packages pyproject.toml installs (each from the folder
    its import name maps to: pkgutil cannot walk the remapped names from `fluxc` down), then their modules."""
    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        packages = tomllib.load(f)["tool"]["setuptools"]["packages"]
    found = {}
    for package in packages:
        spec = importlib.util.find_spec(package)
        found[package] = spec.origin
        for info in pkgutil.iter_modules(spec.submodule_search_locations):
            if not info.ispkg:
                found[f"{package}.{info.name}"] = importlib.util.find_spec(f"{package}.{info.name}").origin
    return found


MODULES = _installed_modules()
RUNTIME = sorted(m for m in MODULES if m == "fluxc.runtime" or m.startswith("fluxc.runtime."))


def test_the_walk_sees_every_layer():
    """Guards the tests below against walking nothing: each installed package has modules."""
    for package in ("fluxc.runtime.core", "fluxc.runtime.ops", "fluxc.frontend", "fluxc.passes", "fluxc.recipes",
                    "fluxc.backends", "fluxc.cli"):
        assert any(m.startswith(package + ".") for m in MODULES), package
    assert "fluxc.runtime.engine" in RUNTIME and "fluxc.build" not in RUNTIME


@pytest.mark.parametrize("module", RUNTIME)
def test_a_runtime_module_imports_only_the_runtime(module):
    code = ("import json, sys, importlib; importlib.import_module(sys.argv[1]); "
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    outside = [m for m in loaded if m.startswith("fluxc.") and not (m == "fluxc.runtime" or m.startswith("fluxc.runtime."))]
    heavy = [m for m in loaded if m.split(".")[0] in FORBIDDEN or m in FORBIDDEN]
    assert not outside, f"{module} imports the compiler: {outside}"
    assert not heavy, f"{module} imports {heavy}"


def imports_of(name: str, path: str) -> set[str]:
    """The fluxc modules `name`'s source imports, anywhere in it: `from a.b import c` is a.b.c where that is a
    module, else a.b."""
    tree = ast.parse(open(path).read(), path)
    package = name if os.path.basename(path) == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in found if m in MODULES and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, colouring nodes)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    graph = {name: imports_of(name, path) for name, path in MODULES.items()}
    assert sum(map(len, graph.values())) > 100  # the walk saw the imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_pass_imports_another_pass():
    shared = {"fluxc.passes", "fluxc.passes.base", "fluxc.passes.linear", "fluxc.passes.weight_formats"}
    for name, path in MODULES.items():
        if name.startswith("fluxc.passes.") and name not in shared | {"fluxc.passes.pipeline"}:
            others = {m for m in imports_of(name, path) if m.startswith("fluxc.passes.") and m not in shared}
            assert not others, f"{name} imports {others}"
