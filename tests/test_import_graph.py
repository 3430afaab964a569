"""No featviz module imports another that imports it back (module- and function-level imports)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "featviz"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def _imports(path: Path, name: str, mods: dict[str, Path]) -> set[str]:
    """Every featviz module ``path`` imports anywhere (top level, functions, classes)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in mods and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(p, m, mods) - {"featviz"} for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_model_facts_modules_stay_at_the_bottom():
    graph = _graph()
    assert graph["featviz.models.description"] == set()  # torch-free, imports no featviz module
    assert "featviz.models.checkpoints" not in graph["featviz.models.architectures"]
    assert graph["featviz.models.features"] <= {"featviz.models.description", "featviz.models.tokens", "featviz.errors"}


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_ad_hoc_model_attributes():
    """The model facts live in featviz.models.description only: no module sets or reads the old attributes."""
    old = ("featviz_normalization", "featviz_method", "featviz_has_classifier", "featviz_arch", "featviz_num_classes")
    for p in PACKAGE.rglob("*.py"):
        text = p.read_text()
        for attr in old:
            assert attr not in text, (p.name, attr)


def test_every_command_loads_its_model_through_the_loader():
    """One load_model: no CLI module builds or loads a model any other way."""
    for p in (PACKAGE / "cli").glob("*.py"):
        text = p.read_text()
        for other in ("load_backbone", "build_backbone", "resolve_model", "load_segmenter"):
            assert other not in text, (p.name, other)
