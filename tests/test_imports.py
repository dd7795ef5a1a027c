"""The package's rooms: every module imports alone, imports run one way (docs/architecture.md)."""

import ast
import subprocess
import sys

from tests import conftest

PACKAGE = conftest.REPO / "puseg_jax"

# Import layers, lowest first: a module may import from its own layer and the ones below only.
# docs/architecture.md draws the same picture; a new module is placed in both.
LAYERS = {
    # Leaves: plain arrays, files and text.
    "datasets": 0,
    "metrics": 0,
    "resample": 0,
    "config_diff": 0,
    "conv_ops": 0,
    "logging_utils": 0,
    "panels": 0,
    # Data; model, losses, devices, checkpoints.
    "prepare": 1,
    "input_pipeline": 1,
    "models": 1,
    "losses": 1,
    "parallel": 1,
    "checkpointing": 1,
    # Evaluation: predict, score, report (uses the drawing leaf); per-case quality control.
    "evaluation": 2,
    "quality": 2,
    # The training loop and its steps.
    "train": 3,
    # Reading finished runs: tables, the notebook's helpers.
    "report": 4,
    "inspect_utils": 4,
    # Command lines.
    "main": 5,
    "visualize": 5,
    "experiments": 5,
    "evaluate": 5,
}


def module_imports(path) -> set[str]:
    """The puseg_jax modules a file imports, at module level or inside functions."""
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y
                parts = (node.module or "").split(".") if node.module else []
                names = parts[:1] if parts else [a.name for a in node.names]
            elif node.module == "puseg_jax":
                names = [a.name for a in node.names]
            elif node.module and node.module.startswith("puseg_jax."):
                names = [node.module.split(".")[1]]
            else:
                names = []
            out |= {n for n in names if n in modules}
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "puseg_jax" and len(parts) > 1 and parts[1] in modules:
                    out.add(parts[1])
    return out


def import_graph() -> dict[str, set[str]]:
    return {
        p.stem: module_imports(p) - {p.stem} for p in PACKAGE.glob("*.py") if p.stem != "__init__"
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_the_cycle_that_was():
    graph = {
        "evaluation": {"visualize"},
        "visualize": {"inspect_utils"},
        "inspect_utils": {"train"},
        "train": {"evaluation"},
        "main": {"train"},
    }
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == set(graph) - {"main"}
    graph["train"] = set()
    assert find_cycle(graph) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "evaluation" in graph and "panels" in graph["evaluation"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_run_down_the_layers():
    graph = import_graph()
    unplaced = sorted(set(graph) - set(LAYERS))
    assert not unplaced, f"place {unplaced} in LAYERS here and in docs/architecture.md"
    upward = [
        f"{m} (layer {LAYERS[m]}) imports {n} (layer {LAYERS[n]})"
        for m, deps in graph.items()
        for n in deps
        if LAYERS[n] > LAYERS[m]
    ]
    assert not upward, upward
    assert not graph["panels"], "panels is a leaf: drawing knows nothing of the package"


def test_every_module_imports_alone():
    # One fresh interpreter; before each module, every puseg_jax module is dropped from
    # sys.modules, so each is imported first, as by a user's `import puseg_jax.<module>`. A
    # cycle between module-level imports fails here with the error users would see.
    script = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    for m in [m for m in sys.modules if m == 'puseg_jax' or m.startswith('puseg_jax.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module('puseg_jax.' + name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc(limit=-3))\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    names = sorted(import_graph())
    result = subprocess.run(
        [sys.executable, "-c", script, *names],
        cwd=conftest.REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
