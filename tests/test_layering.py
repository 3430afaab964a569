"""The file list is the architecture: packages import only downwards, never each other's private names.

The ranks below are the design (docs/architecture.md draws them): a module may import from its own
package or from a package of a lower rank, at module level or inside a function alike; two packages
of the same rank are peers and never import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from test_import_graph import PACKAGE, _graph, _modules

RANKS = {
    "featviz.errors": 0, "featviz.version": 0,
    "featviz.io": 1, "featviz.registry": 1, "featviz.distributed": 1, "featviz.style": 1,
    "featviz.models": 2,
    "featviz.data": 3,
    "featviz.eval": 4, "featviz.collapse": 4,
    "featviz.maps": 5, "featviz.views": 5, "featviz.compare": 5,
    "featviz.train": 6, "featviz.integrations": 6,
    "featviz.demo": 7,
    "featviz.cli": 8,
    "featviz.__main__": 9,
}
MAX_LINES = 600


def _unit(module: str) -> str:
    """The layer a module belongs to: its top-level package under featviz (or the module itself)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        if mod == "featviz":
            continue
        here = _unit(mod)
        for dep in deps:
            there = _unit(dep)
            if there == here:
                continue
            if RANKS[there] >= RANKS[here]:
                bad.append(f"{mod} (rank {RANKS[here]}) imports {dep} (rank {RANKS[there]})")
    return sorted(bad)


def test_every_package_has_a_rank():
    units = {_unit(m) for m in _modules()} - {"featviz"}
    assert units <= set(RANKS), f"give these a rank in RANKS and docs/architecture.md: {sorted(units - set(RANKS))}"


def test_packages_import_only_downwards():
    assert _violations(_graph()) == []


def test_the_layering_rule_catches_an_upward_import():
    assert _violations({"featviz.views.pca": {"featviz.train.loop"}}) == [
        "featviz.views.pca (rank 5) imports featviz.train.loop (rank 6)"]
    assert _violations({"featviz.maps.plotting": {"featviz.views.sheets"}})  # peers: neither imports the other
    assert _violations({"featviz.cli.cam": {"featviz.views.cam.run"},
                        "featviz.views.pca": {"featviz.views.sheets"}}) == []


def _private_imports(path: Path, module: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("featviz") and not node.level:
            if _unit(node.module) == _unit(module):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{module}: from {node.module} import {alias.name}")
    return found


def _root_names(path: Path) -> list[str]:
    """Names ``path`` imports from the root package itself (``from featviz import __version__``), not its modules."""
    subs = {m.split(".")[1] for m in _modules() if m.count(".") >= 1}
    return [
        alias.name
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module == "featviz" and not node.level
        for alias in node.names
        if alias.name not in subs
    ]


def test_no_module_imports_the_root_package():
    """The root package sits above every package (it re-exports them): its names come from their own module."""
    bad = {mod: names for mod, path in _modules().items() if mod != "featviz" and (names := _root_names(path))}
    assert bad == {}, "import these from their own module (e.g. featviz.version), not from featviz: " + str(bad)


def test_the_root_rule_catches_one(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("from featviz import __version__\nfrom featviz import demo as d\n")
    assert _root_names(p) == ["__version__"]


def test_no_private_names_across_packages():
    bad = [line for mod, path in _modules().items() for line in _private_imports(path, mod)]
    assert bad == []


def test_the_private_rule_catches_one(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("from featviz.models.features import _is_vit\nfrom featviz.views.sheets import _x\n")
    assert _private_imports(p, "featviz.views.pca") == [
        "featviz.views.pca: from featviz.models.features import _is_vit"]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_over_600_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {n} lines; split it by concern"
