"""The package layout is the data flow: each layer imports only the layers below it, and no module
imports itself back through others. Read from the code's own imports, so the layout stays true."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "stream_cl"

# Lower layers first. A module may import its own layer's package and the layers listed before it.
LAYERS: list[set[str]] = [
    {"types", "cpus", "config", "log", "metrics"},  # shared by every layer
    {"ingest"},
    {"detect"},
    {"store"},
    {"strategies"},
    {"checks"},  # the strategies' conformance suite
    {"serve"},
    {"evaluate"},
    {"learn"},
    {"replicate"},
    {"runtime"},
    {"tools"},
    {"cli", "__main__", "client"},  # client: the deprecated import path of serve.client
    {"bench"},
]
# Side by side, neither may import the other: listed in one order above only to rank them.
INDEPENDENT = [{"ingest", "detect", "store", "strategies"}]
MAX_MODULE_LINES = 500
MAX_TOP_LEVEL_MODULES = 12


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Every stream_cl module `name` imports, at module level or inside functions."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("stream_cl"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.startswith("stream_cl"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
    modules = _modules()
    return {m for m in found if m in modules and m != name}


def _layer(module: str) -> tuple[int, str]:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank, top
    raise AssertionError(f"{module}: not in any layer of tests/test_layering.py")


def test_every_module_is_in_a_layer() -> None:
    """A new top-level module or package must be placed in the layering on purpose."""
    for name in _modules():
        if name != "stream_cl":
            _layer(name)


def test_no_module_imports_a_layer_above_its_own() -> None:
    """ingest does not import learn, strategies do not import serve, nothing but bench imports bench..."""
    bad = []
    for name, path in _modules().items():
        if name == "stream_cl":
            continue
        rank, top = _layer(name)
        for target in _imports(name, path):
            t_rank, t_top = _layer(target)
            side_by_side = any(top in group and t_top in group for group in INDEPENDENT)
            if t_top != top and (t_rank > rank or side_by_side):
                bad.append(f"{name} -> {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_no_import_cycles() -> None:
    """No module reaches itself again through the modules it imports."""
    modules = _modules()
    graph = {name: _imports(name, path) for name, path in modules.items()}
    # a package's __init__ re-exporting its own modules is not a cycle of the design
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for name in graph:
        if name not in index:
            visit(name)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_size(name: str) -> None:
    """No module over ~500 lines: split it where its parts have names of their own."""
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name}: {lines} lines"


def test_top_level_holds_at_most_a_dozen_modules() -> None:
    """stream_cl/ itself keeps the shared pieces; everything else lives in a package of the flow."""
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_the_analysis_sees_imports() -> None:
    """The checks above would pass vacuously if no import were found: the learner imports the strategies."""
    modules = _modules()
    assert "stream_cl.strategies" in _imports("stream_cl.learn.learner", modules["stream_cl.learn.learner"])
