"""The shape of the code, checked: module sizes, the import graph (no cycle, also none
under TYPE_CHECKING), one exception tree, a session core without I/O, no error
classified by its text, no stubbed host methods, Linux-only imports kept in the splice
engine. Reads the source with `ast`; imports the package only to walk its classes."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import tcpgc
from tcpgc.errors import TcpgcError

SRC = Path(tcpgc.__file__).resolve().parent
MAX_LINES = 400
#: The sans-I/O layer: what it may not import, directly or through tcpgc modules.
SANS_IO = "tcpgc.protocol"
IO_MODULES = {"asyncio", "socket", "ssl", "time", "selectors", "select"}
#: Imports that exist on Linux only (or Unix only), allowed at module level in the
#: splice engine alone: every other module must import on macOS and BSD too.
LINUX_ONLY = {"fcntl"}
SPLICE_ENGINES = {"tcpgc.relay.splice", "tcpgc.relay.chunked_splice"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _imports(name: str, *, module_level_only: bool = False) -> set[str]:
    """Modules `name` imports (tcpgc ones resolved to modules, others top-level names),
    wherever the import statement is: under TYPE_CHECKING and in functions too, unless
    `module_level_only`."""
    tree = ast.parse(MODULES[name].read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {m for m in _imports(name) if m in MODULES} - {name} for name in MODULES}


def test_no_module_over_400_lines() -> None:
    long = {
        name: n
        for name, path in MODULES.items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle_not_even_under_type_checking() -> None:
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_layers_depend_one_way() -> None:
    """Folders are layers: no two of them (or top-level modules) import each other,
    through any chain of modules."""

    def layer(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2])

    layers: dict[str, set[str]] = {}
    for name, imported in _graph().items():
        layers.setdefault(layer(name), set()).update(layer(m) for m in imported)
    for name, imported in layers.items():
        imported.discard(name)
    cycle = _find_cycle(layers)
    assert cycle is None, "layers that depend on each other: " + " -> ".join(cycle or [])


def test_the_session_core_imports_no_io() -> None:
    core = [name for name in MODULES if name.startswith(SANS_IO)]
    assert any(name.endswith("session") for name in core), "no session core found"
    graph = _graph()
    seen: set[str] = set()
    todo = list(core)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(graph[name])
    offenders = {
        name: sorted({m.split(".")[0] for m in _imports(name)} & IO_MODULES)
        for name in sorted(seen)
    }
    offenders = {name: mods for name, mods in offenders.items() if mods}
    assert not offenders, f"the sans-I/O core reaches I/O modules: {offenders}"


def test_every_exception_class_is_in_the_one_tree() -> None:
    strays = []
    for info in pkgutil.walk_packages(tcpgc.__path__, "tcpgc."):
        if info.name == "tcpgc.__main__":
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != info.name or not issubclass(cls, BaseException):
                continue
            if cls.__module__ != "tcpgc.errors" or not issubclass(cls, TcpgcError):
                strays.append(f"{cls.__module__}.{cls.__qualname__}")
    assert not strays, f"exception classes outside tcpgc.errors' tree: {strays}"


def _searches_error_text(node: ast.AST) -> bool:
    """`"..." in str(exc)`, `... in str(exc).lower()` and the like."""
    if not isinstance(node, ast.Compare) or not any(
        isinstance(op, (ast.In, ast.NotIn)) for op in node.ops
    ):
        return False
    for side in node.comparators:
        for sub in ast.walk(side):
            if (
                isinstance(sub, ast.Call)
                and isinstance(sub.func, ast.Name)
                and sub.func.id in {"str", "repr"}
                and sub.args
                and isinstance(sub.args[0], ast.Name)
                and sub.args[0].id in {"exc", "error", "err", "e"}
            ):
                return True
    return False


def test_no_error_is_classified_by_its_text() -> None:
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if _searches_error_text(node):
                found.append(f"{name}:{node.lineno}")
            if isinstance(node, ast.FunctionDef) and node.name == "failure_reason":
                found.append(f"{name}:{node.lineno} (failure_reason)")
    assert not found, f"errors classified by searching their text at {found}"


def test_no_stubbed_host_methods() -> None:
    """Composition, not mixins: no class stubs methods another class provides."""
    stubs = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(target, ast.Name) and target.id == "NotImplementedError":
                    stubs.append(f"{name}:{node.lineno}")
    assert not stubs, f"methods stubbed for a host class at {stubs}"


def test_linux_only_imports_stay_in_the_splice_engine() -> None:
    found = {
        name: sorted(_imports(name, module_level_only=True) & LINUX_ONLY)
        for name in MODULES
        if name not in SPLICE_ENGINES
    }
    found = {name: mods for name, mods in found.items() if mods}
    assert not found, f"Linux-only imports at module level outside the splice engine: {found}"
