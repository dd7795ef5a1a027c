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
        assert set(config.data.source_domains) <= set(info.domains) | set(config.data.extra_domains)


def test_eval_resolution_is_validated():
    from puseg_jax.train import config as train_config
    from tests.conftest import test_config

    assert test_config().eval.resolution == "native"
    train_config.validate_config(test_config(**{"eval.resolution": "network"}))
    with pytest.raises(ValueError, match="eval.resolution 'released'"):
        train_config.validate_config(test_config(**{"eval.resolution": "released"}))


def test_extra_domains_is_settable_on_a_locked_config_from_the_command_line():
    from absl import flags
    from ml_collections import config_flags

    from puseg_jax.train import config as train_config

    # As main.py parses it: a locked config, where only declared fields can be overridden.
    argv = [
        "main",
        f"--config={os.path.join(REPO, 'configs', 'test.py')}",
        "--config.data.extra_domains=('MyHospital',)",
        "--config.data.target_domains=('MyHospital',)",
    ]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    assert config.is_locked
    assert tuple(config.data.extra_domains) == ("MyHospital",)
    train_config.validate_config(config)  # the new domain is known
    config.data.extra_domains = ()
    with pytest.raises(ValueError, match="data.extra_domains"):
        train_config.validate_config(config)


# Workdirs written before data.build_kwargs / data.builder_kwargs were renamed.
OLD_CONFIGS = [
    os.path.join(REPO, "docs", "results", p)
    for p in (
        "fundus_highlight_screen_h200/fundus/cpu/Domain1/ours/seed0/config.json",
        "prostate_cpu_budget_h200/prostate/cpu/BIDMC/ours/seed0/config.json",
    )
]


@pytest.mark.parametrize("path", OLD_CONFIGS, ids=["fundus", "prostate"])
def test_configs_saved_before_the_builder_renames_still_load_and_resume(path):
    import json

    import ml_collections

    from puseg_jax.core import config_diff
    from puseg_jax.train import config as train_config

    with open(path) as f:
        saved = json.load(f)
    old = saved["data"]
    assert "build_kwargs" in old and "builder_kwargs" in old  # the files this test is about
    completed, added = config_diff.with_defaults(saved)
    data = completed["data"]
    assert "build_kwargs" not in data and "builder_kwargs" not in data
    assert data["builder_config"] == old["build_kwargs"]
    assert data["builder_options"] == old["builder_kwargs"]
    assert not any(name.startswith("data.builder_") for name in added)  # moved, not defaulted
    assert saved["data"] is old and "build_kwargs" in saved["data"]  # the input is not modified
    config = ml_collections.ConfigDict(completed)
    train_config.validate_config(config)
    # A checkpoint holding the old names resumes under the new ones without a change.
    current = train_config._config_json(config)
    assert train_config.check_resume_config(saved, current, allow_change=False) == []


def test_rename_table_keeps_a_new_name_already_present():
    from puseg_jax.core import config_diff

    saved = {"data": {"build_kwargs": {"size": 1}, "builder_config": {"size": 2}}, "seed": 3}
    assert config_diff.rename_old_fields(saved) == {
        "data": {"builder_config": {"size": 2}},
        "seed": 3,
    }
    assert config_diff.rename_old_fields({"seed": 3}) == {"seed": 3}
    for old, new in config_diff.RENAMED_FIELDS.items():
        assert "." in old and "." in new and old != new
