"""Imports run one way: every bertscale module imports on its own in a fresh interpreter, and the import graph
read from the source (module-level and function-level imports alike) has no cycle.

A function-level import does not remove a cycle, it only hides it until that function runs; so the graph counts
every `import bertscale...` / `from bertscale... import` wherever it appears. `from P import name` is an edge to
the submodule `P.name` when there is one, else to the package `P` (its `__init__` runs, with whatever it
imports). Importing a submodule also runs its parent packages' `__init__`, but that is not counted as an edge:
Python has already started those packages when the submodule runs.

The stages are layered, model <- train <- finetune <- cli: a module, with every module its functions import,
never loads a module of a stage above its own.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "bertscale"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def bertscale_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def absolute_base(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    """The module a `from ... import` statement reads from, with relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = name.split(".") if is_package else name.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The bertscale modules `path` imports anywhere in its source (module level and inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name.split(".")[0] == "bertscale"}
        elif isinstance(node, ast.ImportFrom):
            base = absolute_base(node, name, path.name == "__init__.py")
            if base.split(".")[0] != "bertscale":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = bertscale_modules()
    known = set(modules)
    return {name: imported_modules(path, name, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path `[a, b, ..., a]`, or None (iterative DFS, so deep graphs do not hit the stack limit)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_graph_reader_sees_function_level_and_relative_imports(tmp_path):
    src = tmp_path / "bertscale" / "train"
    src.mkdir(parents=True)
    (src / "loop.py").write_text(textwrap.dedent("""
        from . import schedule
        from ..model import weights

        def f():
            from bertscale.finetune.suite import run
            import bertscale.config
    """))
    known = {"bertscale.train.schedule", "bertscale.model.weights", "bertscale.finetune.suite", "bertscale.config",
             "bertscale.model"}
    assert imported_modules(src / "loop.py", "bertscale.train.loop", known) == known - {"bertscale.model"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_bertscale_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# Stages from the lowest; a module of one never loads a module of a later one.
LAYERS = ("bertscale.model", "bertscale.train", "bertscale.finetune", "bertscale.cli")

# Runs in one fresh interpreter: third-party packages the library imports at module level are loaded once, then
# every bertscale module is imported in a forked child that has no bertscale module loaded yet (a fresh
# interpreter as far as bertscale is concerned, without paying torch's start-up once per module). The child then
# imports what the module's functions import, and reports any module of a higher stage that got loaded.
ISOLATED_IMPORTS = """
import importlib, json, os, sys, traceback
spec = json.loads(sys.argv[1])
for name in spec["third_party"]:
    try:
        importlib.import_module(name)
    except ImportError:
        pass
assert not any(m == "bertscale" or m.startswith("bertscale.") for m in sys.modules)
layers = spec["layers"]

def layer(name):
    found = [i for i, p in enumerate(layers) if name == p or name.startswith(p + ".")]
    return found[0] if found else None

def check(name, uses):
    importlib.import_module(name)
    for other in uses:
        importlib.import_module(other)
    mine = layer(name)
    if mine is None:
        return ""
    above = sorted(m for m in sys.modules if layer(m) is not None and layer(m) > mine)
    return f"{name} loads {', '.join(above)}, of a stage above its own\\n" if above else ""

failed = 0
for name, uses in spec["modules"].items():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            report = check(name, uses).encode()
        except BaseException:
            report = traceback.format_exc().encode()
        os.write(write, report[-8000:])
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        report = f.read().decode()
    _, status = os.waitpid(pid, 0)
    if report or status:
        failed += 1
        print(f"--- {name} (exit status {status}):\\n{report}")
sys.exit(1 if failed else 0)
"""


def third_party_imports(paths: list[Path]) -> list[str]:
    """Top-level packages other than bertscale that the library imports at module level."""
    names = set()
    for path in paths:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}  # submodules, if any
    return sorted(n for n in names if n.split(".")[0] not in ("bertscale", "__future__"))


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    modules = bertscale_modules()
    graph = import_graph()
    # `python -m bertscale` runs the command line as the module is imported: it is run, never imported.
    names = [n for n in modules if not n.endswith(".__main__") or n == "bertscale.train.__main__"]
    spec = {"modules": {n: sorted(graph[n]) for n in names}, "layers": list(LAYERS),
            "third_party": third_party_imports(list(modules.values()))}
    done = subprocess.run([sys.executable, "-c", ISOLATED_IMPORTS, json.dumps(spec)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
