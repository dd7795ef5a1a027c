"""notebooks/inspect_uncertainty.ipynb: committed clean, and runs headless against workdirs."""

import os
import sys

import nbformat
import pytest

from tests import conftest
from tests.test_visualize import make_volume_workdir

NOTEBOOK = conftest.REPO / "notebooks" / "inspect_uncertainty.ipynb"


def execute_notebook(env: dict[str, str]) -> nbformat.NotebookNode:
    """Runs every cell in a fresh kernel of this interpreter (the venv's), from the notebook's
    folder as Jupyter would, with `env` added to the environment; raises on any cell error."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel imports puseg_jax from this checkout even where it is not pip-installed.
    path = os.pathsep.join(p for p in (str(conftest.REPO), os.environ.get("PYTHONPATH")) if p)
    kernel_env = {**os.environ, "PYTHONPATH": path, **env}
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    # jupyter_client starts the 'python3' kernel spec with sys.executable (the venv's python)
    # and passes `env` to the kernel process.
    client.execute(env=kernel_env)
    return nb


def _outputs(nb, output_type=None, mime=None):
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if mime is not None and mime not in o.get("data", {}):
                continue
            if output_type is None or o["output_type"] == output_type:
                out.append(o)
    return out


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    # No logic of its own: only the package's helpers are imported.
    imports = [
        line.strip()
        for c in code
        for line in c.source.splitlines()
        if line.strip().startswith(("import ", "from "))
    ]
    assert all(
        ("puseg_jax" in line) or line in ("import os", "from IPython.display import Markdown")
        for line in imports
    ), imports


def test_notebook_runs_on_trained_workdirs(tiny_workdir):
    # The same run stands in for both erm and ours, so the side-by-side cell runs fully.
    nb = execute_notebook({"PUSEG_WORKDIR": tiny_workdir, "PUSEG_WORKDIR_ERM": tiny_workdir})
    assert not _outputs(nb, "error")
    text = "".join(o.get("text", "") for o in _outputs(nb, "stream"))
    assert f"{tiny_workdir}: method ours" in text and "inspecting Domain3 (target)" in text
    assert "is 2-D" in text
    # Cases, boundary histogram, reliability, Dice vs uncertainty, and the two comparisons.
    assert len(_outputs(nb, mime="image/png")) == 6
    markdown = _outputs(nb, mime="text/markdown")
    assert (
        len(markdown) == 1 and "| ours | Domain3 | target |" in markdown[0]["data"]["text/markdown"]
    )


def test_notebook_runs_on_a_volume_workdir_without_erm(tmp_path):
    workdir = make_volume_workdir(str(tmp_path / "ours"))
    nb = execute_notebook({"PUSEG_WORKDIR": workdir, "PUSEG_WORKDIR_ERM": str(tmp_path / "absent")})
    text = "".join(o.get("text", "") for o in _outputs(nb, "stream"))
    assert "inspecting SiteC (target)" in text and "No run at" in text
    # Cases, the slice grid, boundary histogram, reliability, Dice vs uncertainty.
    assert len(_outputs(nb, mime="image/png")) == 5


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
