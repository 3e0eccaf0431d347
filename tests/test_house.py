"""The house has no import cycles: every `cross_model` import is at a module's top, and the graph of
those imports is acyclic (a cycle hidden by a function-local import is still a cycle)."""

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "cross_model"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, name: str, is_package: bool) -> list[tuple[str, int, bool]]:
    """(imported cross_model module, line, at top level) for every import in the module."""
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name if is_package else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rsplit(".", 1)[0]
                base = f"{pkg}.{base}" if base else pkg
            # `from cross_model.methods import ac` imports the submodule
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if t == "cross_model" or t.startswith("cross_model."):
                out.append((t, node.lineno, id(node) in top))
    return out


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    local = []
    for mod, path in files.items():
        for target, line, at_top in _imports(
            ast.parse(path.read_text()), mod, path.name == "__init__.py"
        ):
            if target not in files or target == mod:
                continue
            if not at_top:
                local.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
            graph[mod].add(target)
    return graph, local


def test_every_cross_model_import_is_at_the_top_of_its_module():
    _, local = _graph()
    assert not local, "\n".join(local)


def test_the_import_graph_has_no_cycle():
    graph, _ = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError(
                    "import cycle: " + " -> ".join(path[path.index(nxt) :] + [nxt])
                )
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_config_is_a_leaf():
    graph, _ = _graph()
    assert graph["cross_model.config.schema"] == set()
    assert graph["cross_model.config.loading"] == {"cross_model.config.schema"}


def _layers() -> dict[str, int]:
    """docs/ARCHITECTURE.md's layer table: module name (or `pkg.*`) -> layer number."""
    import re

    out = {}
    for line in (ROOT / "docs" / "ARCHITECTURE.md").read_text().splitlines():
        m = re.match(r"^\| (\d+) [^|]*\|[^|]*\|(.*)\|\s*$", line)
        if m:
            for name in re.findall(r"`([^`]+)`", m.group(2)):
                out[name] = int(m.group(1))
    return out


def _layer_of(module: str, layers: dict[str, int]) -> int | None:
    short = module.removeprefix("cross_model.") if module != "cross_model" else "cross_model"
    if short in layers:
        return layers[short]
    for name, layer in layers.items():
        if name.endswith(".*") and (short == name[:-2] or short.startswith(name[:-1])):
            return layer
    return None


def test_every_module_has_a_layer_and_imports_nothing_above_it():
    graph, _ = _graph()
    layers = _layers()
    assert len(set(layers.values())) >= 5, "docs/ARCHITECTURE.md's layer table was not found"
    unplaced = [m for m in graph if _layer_of(m, layers) is None]
    assert not unplaced, f"modules without a layer in docs/ARCHITECTURE.md: {unplaced}"
    upward = [
        f"{m} (layer {_layer_of(m, layers)}) imports {t} (layer {_layer_of(t, layers)})"
        for m, targets in graph.items()
        for t in targets
        if _layer_of(t, layers) > _layer_of(m, layers)
    ]
    assert not upward, "\n".join(upward)
