"""The house: no import loops in sat_train or sat_kernels (every import statement counts, in functions
too, except those under ``if TYPE_CHECKING:``); each sat_train room imports only the rooms below it;
``sat_train.train`` stays the function whatever was imported; ``--help`` loads no torch."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import sat_train
from sat_train.outputs.lora_files import LORA_WEIGHTS_NAME
from train_helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sat_train", "sat_kernels")
# sat_train's rooms, lowest first: a module may import its own room and the rooms before it
LAYERS = (("errors", "faults", "seeding"), ("models",), ("data",), ("guide",), ("outputs",), ("evaluate",), ("demo",), ("run",),
          ("config",), ("cli", "sample", "compare", "kohya", "__main__", "__init__", "assets"))


def module_files() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's own modules that ``name`` imports anywhere, TYPE_CHECKING blocks aside."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for stmt in block.body for node in ast.walk(stmt)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            candidates = [[alias.name] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            # "from a import b": the submodule a.b when there is one, else the module a
            candidates = [[f"{base}.{alias.name}", base] for alias in node.names]
        else:
            continue
        for names in candidates:
            target = next((n for n in names if n in modules), None)
            if target is not None and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each set of modules that import one another (a strongly connected component of 2 or more)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_loops():
    graph = import_graph()
    assert len(graph) > 40 and "sat_train.run.loop" in graph["sat_train.cli"]  # the parser sees in-function imports
    assert cycles(graph) == []


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(module: str) -> int:
    return next(i for i, rooms in enumerate(LAYERS) if room(module) in rooms)


def test_each_room_imports_only_its_own_room_and_the_rooms_below():
    graph = import_graph()
    upward = sorted(f"{source} -> {target}" for source, targets in graph.items() if source.startswith("sat_train")
                    for target in targets if target.startswith("sat_train") and layer(target) > layer(source))
    assert upward == []


def test_train_stays_the_function_after_every_submodule_is_imported(tmp_path):
    """A notebook sweep: every submodule imported (as a test run or an IDE does), then two runs."""
    for info in pkgutil.walk_packages(sat_train.__path__, "sat_train."):
        importlib.import_module(info.name)
    for name in ("first", "second"):
        path = sat_train.train(tiny_config(tmp_path / name, max_train_steps=1))
        assert path == tmp_path / name / LORA_WEIGHTS_NAME and path.is_file()


def test_help_loads_no_torch():
    script = ("import runpy, sys\nsys.argv = ['sat_train', '--help']\ntry:\n"
              "    runpy.run_module('sat_train', run_name='__main__')\nexcept SystemExit:\n    pass\n"
              "print('torch loaded:', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "--guide {none,sac,cac}" in result.stdout, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "torch loaded: False"
