"""The package imports without cycles.

Every module of ``personalize`` is parsed with ``ast`` and the imports between package modules become a graph.
Module-level imports and imports inside functions both count (a lazy import only hides a cycle), imports under
``if TYPE_CHECKING:`` do not (they never run). Any cycle fails the test and is printed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import personalize

PACKAGE = "personalize"
ROOT = Path(personalize.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in the tree, at any depth, except those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # the else branch does run
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module that importing ``name`` runs last: the longest prefix that is a package module."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join([*base, node.module] if node.module else base)
                else:
                    source = node.module or ""
                # ``from pkg import x`` runs pkg.x when x is a module, otherwise it is pkg itself.
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    targets.append(submodule if submodule in modules else source)
            for target in targets:
                if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
                    continue
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != name:
                    graph[name].add(resolved)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), each as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def strongconnect(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                strongconnect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            strongconnect(node)

    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # shortest path back to start inside the component (BFS)
        parents: dict[str, str] = {}
        frontier = [start]
        seen = {start}
        found = None
        while frontier and found is None:
            nxt = []
            for node in frontier:
                for succ in sorted(graph[node] & members):
                    if succ == start:
                        found = node
                        break
                    if succ not in seen:
                        seen.add(succ)
                        parents[succ] = node
                        nxt.append(succ)
                if found is not None:
                    break
            frontier = nxt
        path = [start]
        node = found
        while node is not None and node != start:
            path.append(node)
            node = parents.get(node)
        cycle = [start, *reversed(path[1:]), start]
        cycles.append(cycle + [f"(component: {', '.join(component)})"])
    return cycles


def test_graph_sees_the_package() -> None:
    graph = import_graph()
    assert "personalize.personalizer" in graph
    assert "personalize.data.store" in graph["personalize.personalizer"]
    assert graph[PACKAGE], "personalize/__init__ imports package modules"


def test_finder_reports_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    cycles = find_cycles(graph)
    assert len(cycles) == 1
    assert cycles[0][:4] == ["a", "b", "c", "a"]


def test_lazy_and_type_checking_imports() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from personalize.data import store\n"
        "def f():\n    from personalize.serving.router import Router\n"
    )
    names = [getattr(node, "module", None) for node in _imports(tree)]
    assert names == ["typing", "personalize.serving.router"]


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in personalize:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_imports_in_a_fresh_interpreter() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import personalize; print(personalize.__version__)"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT.parent,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == personalize.__version__


def test_every_exception_lives_in_errors_and_is_exported() -> None:
    """No module but ``errors`` defines an exception class, and ``personalize`` exports every one of them."""
    from personalize import errors

    elsewhere = []
    for name, path in _modules().items():
        if name == "personalize.errors":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(base).rsplit(".", 1)[-1] for base in node.bases}
                if any(b.endswith(("Error", "Exception", "Cancelled")) for b in bases) or node.name.endswith(
                    ("Error", "Cancelled")
                ):
                    elsewhere.append(f"{name}.{node.name}")
    assert not elsewhere, f"exceptions defined outside personalize.errors: {elsewhere}"
    defined = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == errors.__name__
    }
    assert "PersonalizeError" in defined and len(defined) > 10
    assert defined <= set(personalize.__all__), (
        f"not exported by personalize: {sorted(defined - set(personalize.__all__))}"
    )
    for name in defined:
        assert getattr(personalize, name) is getattr(errors, name)
        assert issubclass(getattr(errors, name), errors.PersonalizeError)


def test_moved_names_still_import_from_their_old_modules() -> None:
    """What moved to cut a cycle stays importable from where it was, as the same object."""
    from personalize import errors
    from personalize.adapters import cache as adapters
    from personalize.adapters import peft_utils, training
    from personalize.eval import calibration
    from personalize.eval import config as eval_config
    from personalize.eval import runner as evaluation
    from personalize.jobs import process_ids
    from personalize.jobs import store as jobs
    from personalize.retrieval import vectorstore

    moved = [
        (evaluation, eval_config, ["EVAL_METHODS", "EvalConfig", "code_version", "default_methods", "resolve_methods"]),
        (training, peft_utils, ["private_base_copy", "strip_tuner_layers"]),
        (training, errors, ["AdapterExistsError", "TrainingCancelled"]),
        (adapters, errors, ["AdapterUnavailableError"]),
        (jobs, process_ids, ["local_pid_alive", "worker_identity"]),
    ]
    for old, new, names in moved:
        for name in names:
            assert getattr(old, name) is getattr(new, name), f"{old.__name__}.{name}"
    from personalize.adapters import format as adapter_format
    from personalize.data import indexing

    assert training.read_metadata is adapter_format.read_metadata
    assert training.ADAPTER_METADATA == adapter_format.ADAPTER_METADATA
    assert indexing.vector_metadata is vectorstore.vector_metadata
    assert callable(calibration.calibrate_from_run)


def test_the_dashboard_reads_through_library_functions_only() -> None:
    """No SQL, no table classes in the dashboard: what it shows comes from the library's report functions."""
    root = Path(__file__).resolve().parents[1] / "dashboard"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.name}: {n}" for n in names if n.startswith(("sqlalchemy", "personalize.data.schema"))]
    assert len(list(root.rglob("*.py"))) >= 5
    assert offenders == []
