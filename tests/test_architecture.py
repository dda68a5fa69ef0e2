"""The package's layout holds: its module import graph is acyclic (function-level imports
included, so none can hide a cycle), the library never imports the command line, and a
function-level import is there only for a heavy or optional third-party dependency, saying so."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edgeprune"
# Files another change is rewriting right now; their function-level imports are tolerated until it
# lands. Empty this set then.
PENDING: set[str] = set()  # files whose imports were in flight while the rules landed (now none)
REASON = re.compile(r"#\s*(heavy|optional)\b")  # "# heavy: ..." or "# optional dependency ..."


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _type_checking_only(node, parents) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, anywhere in its body (not under TYPE_CHECKING)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or _type_checking_only(node, parents):
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("edgeprune"):
                target = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                hit = sub if sub in modules else target
                if hit in modules and hit != name:
                    graph[name].add(hit)
    return graph


def test_the_module_import_graph_is_acyclic():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_library_never_imports_the_command_line():
    graph = import_graph()
    offenders = sorted(m for m, deps in graph.items()
                       if not m.startswith("edgeprune.cli") and m != "edgeprune.__main__"
                       and any(d == "edgeprune.cli" or d.startswith("edgeprune.cli.") for d in deps))
    assert offenders == [], offenders


def function_level_imports():
    """(file, line, statement, its comment says why, it imports an edgeprune module) of every import
    inside a function body of the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        seen = set()
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in seen:
                    continue
                seen.add(node.lineno)
                yield (path.relative_to(PACKAGE.parent).as_posix(), node.lineno, lines[node.lineno - 1].strip(),
                       _says_why(lines, node), _imports_package(node))


def _says_why(lines: list[str], node: ast.stmt) -> bool:
    """A ``# heavy`` / ``# optional`` comment on the statement, on the line directly above it, or
    above the first of a run of import lines it belongs to."""
    if any(REASON.search(line) for line in lines[node.lineno - 1:node.end_lineno]):
        return True
    above = node.lineno - 2
    while above >= 0 and lines[above].strip().startswith(("import ", "from ")):
        if REASON.search(lines[above]):
            return True
        above -= 1
    return above >= 0 and lines[above].strip().startswith("#") and bool(REASON.search(lines[above]))


def _imports_package(node: ast.stmt) -> bool:
    if isinstance(node, ast.ImportFrom):
        return bool(node.level) or (node.module or "").split(".")[0] == "edgeprune"
    return any(alias.name.split(".")[0] == "edgeprune" for alias in node.names)


def test_library_code_imports_the_package_only_at_module_level():
    """A function-level import of one of our own modules hides a dependency (or a cycle); only the
    command line may defer a library module, for its start-up time."""
    offenders = [f"{f}:{line}: {text}" for f, line, text, _, own in function_level_imports()
                 if own and not f.startswith("edgeprune/cli/") and f not in PENDING]
    assert offenders == [], "\n".join(offenders)


def test_every_function_level_import_says_why():
    """What is left inside functions is a heavy or optional dependency, and its comment says which."""
    offenders = [f"{f}:{line}: {text}" for f, line, text, why, _ in function_level_imports()
                 if not why and f not in PENDING]
    assert offenders == [], "\n".join(offenders)
