"""The package's import graph, read from the source (ast): no cycles, and no import that runs up a layer.

Layers, lowest first: ``core`` (config, errors, files, prompts) < ``engine`` (the method; knows no model and no
world) < ``families`` (one folder per model family) < ``real`` (the real-model path over any family) and
``offline`` (the toy worlds), which do not import each other < the commands at the top level. Function-level
imports count: a lazy import still ties two modules together. A family's folder is private to it: everything
else reaches a family through ``families/registry.py`` and the ``ModelFamily`` interface (``families/base.py``).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "src" / "twostep"
LAYERS = {"core": 0, "engine": 1, "families": 2, "real": 3, "offline": 3}
TOP = 4  # cli, demo, bench, testing: the commands and the test helpers


def module_name(path: pathlib.Path, package: pathlib.Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: {twostep modules it imports}}`` for every ``.py`` file under ``package``."""
    files = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:  # `from twostep.engine import flow` imports the module engine.flow
                    deps.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in files else target)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    group = parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "top"
    return group, LAYERS.get(group, TOP)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in sorted(graph.items()):
        group, level = layer(module)
        for dep in sorted(deps):
            dep_group, dep_level = layer(dep)
            if dep in ("twostep", f"twostep.{group}"):
                continue  # a package's own docstring-only __init__
            if dep_level > level or (dep_level == level and dep_group != group):
                bad.append(f"{module} ({group}) imports {dep} ({dep_group})")
    return bad


def test_the_package_has_no_import_cycle():
    assert cycles(read_graph()) == []


def test_no_import_runs_up_a_layer():
    assert upward_imports(read_graph()) == []


def test_the_engine_imports_no_family_world_or_command():
    graph = read_graph()
    engine = {m: d for m, d in graph.items() if m.startswith("twostep.engine")}
    assert engine, "no engine modules found: the layout test reads the wrong folder"
    outside = sorted(f"{m} -> {d}" for m, deps in engine.items() for d in deps
                     if not d.startswith(("twostep.engine", "twostep.core")))
    assert outside == []


# the modules directly under families/ are the shared kit every family may use (the interface, the registry, ...)
SHARED_FAMILY_MODULES = {path.stem for path in (PACKAGE / "families").glob("*.py")}


def family_private_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports of ``twostep.families.<name>`` from outside that family's folder. Allowed: the registry (which
    picks a family) and ``twostep.testing`` (the tests' one door to every family's tiny models)."""
    bad = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            parts = dep.split(".")
            if len(parts) < 3 or parts[1] != "families" or parts[2] in SHARED_FAMILY_MODULES:
                continue
            own = ".".join(parts[:3])
            if module != own and not module.startswith(own + ".") and module not in (
                    "twostep.families.registry", "twostep.testing"):
                bad.append(f"{module} imports {dep}")
    return bad


def named_classes(path: pathlib.Path, names: set[str]) -> set[str]:
    """Which of ``names`` the code of ``path`` uses as identifiers or imports (docstrings and comments do not
    count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Name) and node.id in names:
            found.add(node.id)
        elif isinstance(node, ast.Attribute) and node.attr in names:
            found.add(node.attr)
        elif isinstance(node, ast.alias) and node.name.split(".")[-1] in names:
            found.add(node.name.split(".")[-1])
    return found


def test_only_a_family_and_the_registry_import_a_family():
    assert family_private_imports(read_graph()) == []


def test_nothing_outside_a_family_names_its_diffusers_classes():
    from twostep.families.registry import all_families

    outside = []
    for family in all_families():
        names = {*family.pipeline_classes, family.transformer_class} - {""}
        assert names, f"{family} declares no pipeline or transformer class"
        own = PACKAGE / "families" / family.name
        for path in sorted(PACKAGE.rglob("*.py")):
            if own not in path.parents:
                outside += [f"{path.relative_to(PACKAGE)} names {n}" for n in sorted(named_classes(path, names))]
    assert outside == []


@pytest.mark.parametrize("source, problem", [
    ({"a.py": "from twostep.b import x", "b.py": "def f():\n    from twostep import a"}, "cycle"),
    ({"engine/__init__.py": "", "engine/m.py": "from twostep.offline import w", "offline/__init__.py": "",
      "offline/w.py": ""}, "up"),
    ({"real/__init__.py": "", "real/m.py": "from twostep.offline.w import x", "offline/__init__.py": "",
      "offline/w.py": ""}, "up"),
    ({"families/__init__.py": "", "families/a/__init__.py": "", "families/a/m.py": "",
      "real/__init__.py": "", "real/m.py": "from twostep.families.a.m import x"}, "family"),
])
def test_the_checks_fail_on_a_bad_graph(tmp_path, source, problem):
    package = tmp_path / "twostep"
    for name, text in {"__init__.py": "", **source}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    graph = read_graph(package)
    if problem == "cycle":
        assert cycles(graph) == [["twostep.a", "twostep.b"]]
    elif problem == "family":
        assert family_private_imports(graph) == ["twostep.real.m imports twostep.families.a.m"]
    else:
        assert upward_imports(graph)


def test_the_class_check_sees_code_not_prose(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('"""Uses ``FooPipeline``."""\nfrom diffusers import FooPipeline\nx = diffusers.FooModel  # FooPipeline\n')
    assert named_classes(path, {"FooPipeline", "FooModel", "Other"}) == {"FooPipeline", "FooModel"}
