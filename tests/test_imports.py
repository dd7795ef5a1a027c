"""The package's rooms: every module imports alone, imports run one way (docs/architecture.md)."""

import ast
import subprocess
import sys

from tests import conftest

PACKAGE = conftest.REPO / "puseg_jax"

# Import layers of the sub-packages (and top-level modules), lowest first: a module may import
# from its own layer and the ones below only. docs/architecture.md draws the same picture; a new
# sub-package is placed in both.
LAYERS = {
    # Leaves: plain arrays, files and text; drawing knows nothing of the package.
    "core": 0,
    "metrics": 0,
    "drawing": 0,
    # Data; the model, its convolutions and losses; devices.
    "data": 1,
    "model": 1,
    "parallel": 1,
    # Evaluation: predict, score, report (uses the drawing leaf); per-case quality control.
    "evaluators": 2,
    # The config checks, the steps, the training loop and its checkpoints.
    "train": 3,
    # Reading and running finished runs; a trained run on a new hospital's folder.
    "runs": 4,
    "external": 4,
    # Command lines.
    "main": 5,
    "evaluate": 5,
    "visualize": 5,
    "experiments": 5,
    "report": 5,
}


def module_name(path) -> str:
    """'core.datasets' for puseg_jax/core/datasets.py; 'metrics' for its __init__.py."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, object]:
    """Every module of the package (recursively) by name, the package's own __init__ left out."""
    return {
        module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if p != PACKAGE / "__init__.py"
    }


def module_imports(path, modules) -> set[str]:
    """The puseg_jax modules a file imports, at module level or inside functions."""
    return source_imports(path.read_text(), module_name(path), path.name == "__init__.py", modules)


def source_imports(source: str, name: str, is_package: bool, modules) -> set[str]:
    """The puseg_jax modules the source of module `name` imports."""

    def resolve(dotted: str, names: list[str]) -> set[str]:
        # `from puseg_jax.<dotted> import <names>`: a name is a module when one is called so.
        found = {f"{dotted}.{n}" if dotted else n for n in names}
        found = {m for m in found if m in modules}
        if dotted and (not found or len(found) < len(names)) and dotted in modules:
            found.add(dotted)
        return found

    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level:  # relative: resolved against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                dotted = ".".join(base + ([node.module] if node.module else []))
                out |= resolve(dotted, names)
            elif node.module == "puseg_jax":
                out |= resolve("", names)
            elif node.module and node.module.startswith("puseg_jax."):
                out |= resolve(node.module[len("puseg_jax.") :], names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("puseg_jax."):
                    dotted = a.name[len("puseg_jax.") :]
                    if dotted in modules:
                        out.add(dotted)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (itself left out)."""
    modules = all_modules()
    return {m: module_imports(p, modules) - {m} for m, p in modules.items()}


def package_of(module: str) -> str:
    return module.split(".")[0]


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Sub-package (or top-level module) -> those it imports, imports within one left out."""
    out: dict[str, set[str]] = {package_of(m): set() for m in graph}
    for m, deps in graph.items():
        out[package_of(m)] |= {package_of(n) for n in deps} - {package_of(m)}
    return out


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


def test_source_imports_resolves_modules_and_packages():
    modules = {"core.datasets", "metrics", "metrics.overlap", "runs.workdir", "train"}
    source = (
        "from puseg_jax import metrics\n"
        "from puseg_jax.core import datasets\n"
        "def f():\n"
        "    from puseg_jax.metrics.overlap import compute_dice\n"
        "    import puseg_jax.core.datasets\n"
        "from .workdir import x\n"
    )
    found = source_imports(source, "runs.example", False, modules)
    assert found == {"metrics", "core.datasets", "metrics.overlap", "runs.workdir"}


def test_no_import_cycle_among_modules_or_packages():
    graph = import_graph()
    assert "evaluators.case_panels" in graph["evaluators.reports"]
    assert "drawing.panels" in graph["evaluators.case_panels"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between modules: " + " -> ".join(cycle)
    cycle = find_cycle(package_graph(graph))
    assert cycle is None, "import cycle between sub-packages: " + " -> ".join(cycle)


def test_imports_run_down_the_layers():
    graph = import_graph()
    packages = package_graph(graph)
    unplaced = sorted(set(packages) - set(LAYERS))
    assert not unplaced, f"place {unplaced} in LAYERS here and in docs/architecture.md"
    upward = [
        f"{m} (layer {LAYERS[package_of(m)]}) imports {n} (layer {LAYERS[package_of(n)]})"
        for m, deps in graph.items()
        for n in deps
        if LAYERS[package_of(n)] > LAYERS[package_of(m)]
    ]
    assert not upward, upward
    assert not packages["drawing"], "drawing is a leaf: it knows nothing of the package"


def test_train_package_imports_without_the_loop():
    # The config checks are used by the notebook's helpers and `evaluate`: importing them must
    # not load the training loop (and with it the data pipeline and the evaluators' reports).
    script = (
        "import sys\n"
        "import puseg_jax.train.config\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('puseg_jax.train.'))\n"
        "assert loaded == ['puseg_jax.train.config'], loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=conftest.REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


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
    assert len(names) > 40 and "evaluators.scoring" in names and "metrics" in names
    result = subprocess.run(
        [sys.executable, "-c", script, *names],
        cwd=conftest.REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
