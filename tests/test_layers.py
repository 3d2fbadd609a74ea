"""The package's folders form layers: each imports only layers below it, lazily or not.

``tests/train/test_run.py`` looks for module cycles among module-level imports; a lazy import inside a
function hides a loop from it (``train -> rollouts -> proxy -> train`` once did). This test reads
every import, function-level ones included, maps each module to its folder (a top-level module
such as ``records.py`` is its own folder) and checks the folder sits below the importer.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

import lightning_lab

ROOT = Path(lightning_lab.__file__).parent
PACKAGE = ROOT.name

LAYERS: list[set[str]] = [
    {"errors", "paths", "records"},  # the data model and its error types: import nothing of ours
    {"tracing", "envs"},             # how calls are recorded; the environment registry (records)
    {"credit", "inference"},         # rewards -> advantages; model, policy, engine, weights on disk
    {"traces", "rollouts"},          # trace files -> trajectories; agents -> trajectories
    {"proxy"},                       # the OpenAI-compatible server over an inference policy
    {"train"},                       # trainers and the run pipeline (incl. --agent user agents)
    {"workbench", "integrations"},   # widgets, W&B, sweeps; adapters for agent frameworks
    {"cli", PACKAGE},                # the command line and ``import lightning_lab`` (lazy facade)
]
"""Lowest first. A folder may import its own modules and folders of lower layers, never one of
its own layer or above. ``envs.py`` (the registry, which imports only ``records``) sits low
because ``rollouts`` and ``train`` look environments up; ``integrations`` imports only
``tracing`` but is a leaf users import, so it sits with ``workbench``."""

ALLOWED: set[tuple[str, str]] = set()
"""(importer module, imported module) pairs that break the order knowingly, each with its reason."""

RANK = {folder: rank for rank, layer in enumerate(LAYERS) for folder in layer}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")


def folder_of(module: str) -> str:
    """``lightning_lab.train.run`` -> ``train``; ``lightning_lab.records`` -> ``records``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def imported_modules(path: Path) -> Iterator[tuple[str, int]]:
    """Every ``lightning_lab`` module ``path`` imports (anywhere in it), with the line."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return imports_in(path.read_text(encoding="utf-8"), package)


def imports_in(source: str, package: str) -> Iterator[tuple[str, int]]:
    """The ``lightning_lab`` modules ``source`` (a module of ``package``) imports, anywhere in
    it: module level, inside functions, relative or absolute."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names
                        if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base == PACKAGE:  # `from lightning_lab import tracing` / `from .. import tracing`
                yield from ((_submodule(a.name), node.lineno) for a in node.names)
            elif base.split(".")[0] == PACKAGE:
                yield base, node.lineno


def _submodule(name: str) -> str:
    """``from lightning_lab import <name>``: the module ``name`` is, else the package facade."""
    is_module = (ROOT / name).is_dir() or (ROOT / f"{name}.py").is_file()
    return f"{PACKAGE}.{name}" if is_module else PACKAGE


def layer_violations() -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        importer = module_name(path)
        for imported, line in imported_modules(path):
            here, there = folder_of(importer), folder_of(imported)
            if here == there or (importer, imported) in ALLOWED:
                continue
            if RANK[there] >= RANK[here]:
                found.append(f"{path.relative_to(ROOT.parent)}:{line}: {here} imports {imported} "
                             f"({there} is not below {here})")
    return found


def test_every_folder_has_a_layer():
    folders = {folder_of(module_name(p)) for p in ROOT.rglob("*.py")}
    assert folders - set(RANK) == set(), "add new folders to LAYERS in tests/test_layers.py"


def test_no_folder_imports_its_own_layer_or_above_even_lazily():
    found = layer_violations()
    assert not found, "imports against the layer order:\n" + "\n".join(found)


def test_function_level_imports_are_read():
    """Lazy imports count: inside functions, relative or absolute, from the package facade."""
    source = """
import json
from . import jobs
def agent():
    from ..proxy import serve
    import lightning_lab.train.run
    from lightning_lab import tracing, serve
    from .. import records
"""
    found = {m: line for m, line in imports_in(source, f"{PACKAGE}.rollouts")}
    assert found == {f"{PACKAGE}.rollouts": 3, f"{PACKAGE}.proxy": 5,
                     f"{PACKAGE}.train.run": 6, f"{PACKAGE}.tracing": 7, PACKAGE: 7,
                     f"{PACKAGE}.records": 8}
    assert [folder_of(m) for m in sorted(found)] == [PACKAGE, "proxy", "records", "rollouts",
                                                     "tracing", "train"]
