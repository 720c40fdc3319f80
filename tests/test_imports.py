"""bigtrain's modules import one another without a cycle, counting imports inside functions: each
module can be read (and loaded) after the ones it uses. An edge from a module to a package that
contains it is not counted (Python imports a submodule's packages first, always)."""

from __future__ import annotations

import ast
from pathlib import Path

from common import REPO


def module_graph(root: Path) -> dict[str, set[str]]:
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def test_the_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import x\n")
    (pkg / "a.py").write_text("x = 1\ndef f():\n    from pkg.b import y\n")
    (pkg / "b.py").write_text("from . import a\ny = 2\n")
    (pkg / "c.py").write_text("from pkg import a\n")  # c -> a only: no cycle with the package
    assert cycles(module_graph(pkg)) == [["pkg.a", "pkg.b"]]


def test_bigtrain_has_no_import_cycle():
    graph = module_graph(REPO / "bigtrain")
    assert len(graph) > 40 and any(graph.values())
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_every_built_in_task_names_a_class_that_keeps_the_task_contract():
    """The registry's references load, and each built task has every member of bigtrain.api.Task
    (on its class, or set by its constructor; tokenizer_dir is a property that answers only after
    `prepare`, so isinstance against the protocol cannot be asked before)."""
    from bigtrain.api import Task
    from bigtrain.config import TASKS, load_config
    from bigtrain.tasks import BUILTIN_TASKS, build_task

    members = [m for m in dir(Task) if not m.startswith("_")] + list(Task.__annotations__)
    assert "evaluate" in members and "model_task" in members and "tokenizer_dir" in members
    assert sorted(BUILTIN_TASKS) == sorted(TASKS)
    for name in TASKS:
        task = build_task(load_config(None, [f"task={name}"]))
        missing = [m for m in members if not (hasattr(type(task), m) or m in vars(task))]
        assert not missing and task.model_task in ("clm", "mlm", "classify", "token_classify"), (name, missing)
