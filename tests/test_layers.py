"""The layers import one way. Every import of the package is read with an AST pass (lazy imports inside
functions included: the setup.py folder mapping hides them from import-graph tools), then checked against the
layer order and for cycles between modules.

    face (gpuforge/) -> profiling -> parallel -> models -> quant -> kernels
    inside parallel: comm -> data_parallel -> model_parallel -> checkpoint -> training (each only downward)
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"gpuforge": "gpuforge", "kernels": "gpuforge.kernels", "models": "gpuforge.models",
           "quant": "gpuforge.quant", "parallel": "gpuforge.parallel", "profiling": "gpuforge.profiling",
           "csrc": "gpuforge.csrc"}
# what a layer may not import
FORBIDDEN = {
    "kernels": {"quant", "models", "parallel", "profiling", "face"},
    "quant": {"models", "parallel", "profiling", "face"},
    "models": {"parallel", "profiling", "face"},
    "parallel": {"profiling", "face"},
    "profiling": {"face"},
}
PARALLEL_ORDER = ("comm", "data_parallel", "model_parallel", "checkpoint", "training")


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The project modules a file imports: `from a import b` names module a.b when that is a module."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] == "gpuforge"}
    return out


GRAPH = {module: _imports(path) for module, path in MODULES.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("kernels", "models", "quant", "parallel", "profiling", "csrc"):
        return parts[1]
    return "face"


def _parallel_layer(module: str) -> int | None:
    parts = module.split(".")
    return PARALLEL_ORDER.index(parts[2]) if len(parts) > 2 and parts[2] in PARALLEL_ORDER else None


def test_the_pass_sees_the_tree():
    assert len(MODULES) > 100 and "gpuforge.kernels.triton.softmax" in MODULES
    assert "gpuforge.kernels.backends" in GRAPH["gpuforge.kernels.dispatch"]
    # a lazy import inside a function is seen
    assert "gpuforge.kernels.triton.softmax" in GRAPH["gpuforge.kernels.softmax"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    me = layer(module)
    bad = sorted(target for target in GRAPH[module] if layer(target) in FORBIDDEN.get(me, ()))
    assert not bad, f"{module} ({me}) imports {bad}, against the layer order"
    mine = _parallel_layer(module)
    if mine is not None:
        upward = sorted(t for t in GRAPH[module] if (theirs := _parallel_layer(t)) is not None and theirs > mine)
        assert not upward, f"{module} imports {upward}: inside parallel/ the order is {' -> '.join(PARALLEL_ORDER)}"


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), over edges between project modules;
    an import of a package's own ancestor (its __init__ runs first anyway) is not an edge."""
    edges = {m: {t for t in targets if t in MODULES and not m.startswith(t + ".")} for m, targets in GRAPH.items()}
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles() == []


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
    """The check above can fail: a two-module cycle planted in the graph is reported."""
    monkeypatch.setitem(GRAPH, "gpuforge.kernels.backends", GRAPH["gpuforge.kernels.backends"] |
                        {"gpuforge.kernels.dispatch"})
    assert ["gpuforge.kernels.backends", "gpuforge.kernels.dispatch"] in _cycles()
