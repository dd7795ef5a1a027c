"""Shared fixtures. 8 fake CPU devices are set here, before anything imports JAX."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# `compile_cache_dir='auto'` (the configs' default) writes under $XDG_CACHE_HOME: a temporary
# folder of this session, so that the tests leave nothing in the user's home.
os.environ["XDG_CACHE_HOME"] = __import__("tempfile").mkdtemp(prefix="puseg_test_cache_")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def test_config(**overrides):
    """configs/test.py with dotted overrides, e.g. test_config(**{"method": "erm"})."""
    from configs import test as test_cfg

    config = test_cfg.get_config()
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


# A helper, not a test: modules that import it must not collect it.
test_config.__test__ = False


def random_batches(num_steps: int, size: int, batch: int = 8) -> list[dict]:
    """Fixed random fundus-like batches (3 channels, classes 0-2) for step-level tests."""
    import numpy as np

    rs = np.random.RandomState(0)
    return [
        {
            "image": rs.randn(batch, size, size, 3).astype(np.float32),
            "mask": rs.randint(0, 3, (batch, size, size)).astype(np.int32),
        }
        for _ in range(num_steps)
    ]


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
    """One TFDS data dir for the session (the tiny synthetic sets are built once)."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory, tfds_dir) -> str:
    """A workdir trained once per session with configs/test.py (method 'ours'), with eval
    reports, predictions.npz and checkpoints; shared by the eval, notebook and CLI tests."""
    from puseg_jax.train import trainer

    workdir = str(tmp_path_factory.mktemp("tiny_workdir"))
    trainer.train_and_evaluate(test_config(**{"data.data_dir": tfds_dir}), workdir)
    return workdir


# CI sets this: there the real data must be present, and a test that needs it fails instead of
# skipping (a skip would let a broken data path pass unnoticed). Users' clones have no data.
REQUIRE_SHARED_DATA = os.environ.get("PUSEG_REQUIRE_SHARED_DATA", "") not in ("", "0")


def missing_shared_data(folder: Path = SHARED_DATA) -> None:
    """Skips the calling test when `folder` is absent, or fails it where the data is required."""
    if folder.is_dir():
        return
    message = f"real data not found at {folder} (it lies beside the checkout in development and CI)"
    if REQUIRE_SHARED_DATA:
        pytest.fail(f"{message}; PUSEG_REQUIRE_SHARED_DATA is set, so this is a failure")
    pytest.skip(message)


def pytest_runtest_setup(item):
    """Tests marked `real_data` need ../shared/data."""
    if item.get_closest_marker("real_data") is not None:
        missing_shared_data()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    missing_shared_data()
    return SHARED_DATA
