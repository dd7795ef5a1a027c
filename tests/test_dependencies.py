"""setup.cfg declares what the code imports, and the few runtime-only packages stay needed."""

import configparser
import os
import re
import subprocess
import sys

from tests.conftest import REPO

# Distribution -> the module it is imported as.
IMPORT_NAMES = {
    "orbax-checkpoint": "orbax",
    "tensorflow-datasets": "tensorflow_datasets",
    "ml-collections": "ml_collections",
    "pillow": "PIL",
    "absl-py": "absl",
}
# Imported by the libraries at run time, never by name here (setup.cfg says why for each).
RUNTIME_ONLY = {"jaxlib", "array_record", "importlib_resources"}
CODE_DIRS = ("puseg_jax", "data_builders", "configs")


def _install_requires() -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO, "setup.cfg"))
    lines = parser["options"]["install_requires"].splitlines()
    return [re.split(r"[=<>!~;\[ ]", line.strip())[0] for line in lines if line.strip()]


def _imported_modules() -> set[str]:
    pattern = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)
    found = set()
    for top in CODE_DIRS:
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(root, name), encoding="utf-8") as f:
                        found.update(pattern.findall(f.read()))
    return found


def test_every_declared_dependency_is_imported_or_a_named_runtime_one():
    declared = _install_requires()
    assert "clu" in declared and "jax" in declared  # the parse found the list
    imported = _imported_modules()
    unused = [
        d
        for d in declared
        if d not in RUNTIME_ONLY and IMPORT_NAMES.get(d, d.replace("-", "_")) not in imported
    ]
    assert unused == [], f"declared in setup.cfg but imported nowhere: {unused}"
    assert RUNTIME_ONLY <= set(declared)


def test_tfds_still_needs_importlib_resources_without_tensorflow():
    # When this fails, TFDS declares or no longer needs it: drop it from setup.cfg.
    code = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "importlib_resources":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Block())
import tensorflow_datasets as tfds
import data_builders  # noqa: F401  (registers the builders)
from puseg_jax.core.datasets import get_dataset_info
try:
    tfds.builder_cls(get_dataset_info("synth_fundus").builder).code_path
except ModuleNotFoundError as e:
    print("missing", e.name)
else:
    print("not needed")
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "missing importlib_resources"
