"""Every config file loads and names things that exist."""

import glob
import importlib.util
import os

import pytest

from puseg_jax import parallel
from puseg_jax.core import datasets
from puseg_jax.model import losses
from tests.conftest import REPO

CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def _load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _configs(path):
    module = _load(path)
    if not hasattr(module, "get_config"):
        return []
    args = getattr(module, "CONFIG_ARGS", [None])
    return [module.get_config(a) if a is not None else module.get_config() for a in args]


@pytest.mark.parametrize("path", [p for p in CONFIG_FILES if not p.endswith("__init__.py")])
def test_config_resolves(path):
    from puseg_jax.train import config as train_config

    configs = _configs(path)
    assert configs, f"{path} has no get_config"
    for config in configs:
        assert config.method in losses.METHODS
        assert config.parallel.strategy in parallel.STRATEGIES
        info = datasets.get_dataset_info(config.data.name)
        train_config.validate_config(config)
        assert config.data.image_size % 2 ** (len(config.model.widths) - 1) == 0
        assert set(config.data.source_domains) <= set(info.domains) | set(
            config.data.get("extra_domains", ())
        )


def test_eval_resolution_is_validated():
    from puseg_jax.train import config as train_config
    from tests.conftest import test_config

    assert test_config().eval.resolution == "native"
    train_config.validate_config(test_config(**{"eval.resolution": "network"}))
    with pytest.raises(ValueError, match="eval.resolution 'released'"):
        train_config.validate_config(test_config(**{"eval.resolution": "released"}))
