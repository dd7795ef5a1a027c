"""Which config fields change what a run computes, and which are incidental.

One list, used twice: resuming a workdir whose saved config differs in a field that changes the
computation is an error (`trainer.train_and_evaluate`), and the experiment runner names each run's
folder by every override that is not incidental (`suite.run_dir`), so that runs that
compute different things never share a folder or a table row.

Incidental fields change how a run is logged, stored, laid out on devices, compiled or where it
reads its files from, never its numbers beyond float rounding: the 1-vs-N-device equality is
tested (tests/test_parallel.py), so are several steps per compiled call and rematerialisation
against single steps without it (tests/test_levers.py, 1e-5), evaluation batches are padded
without changing any prediction, and the data folders are addresses of the same bytes.
"""

import copy
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_FILE = Path(__file__).resolve().parents[2] / "configs" / "default.py"

# Dotted names; a name ending in '.' covers every field under that group.
INCIDENTAL_FIELDS = (
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "allow_config_change",
    "compile_cache_dir",
    "steps_per_call",
    "model.remat",
    "data.data_dir",
    "data.manual_dir",
    # Stores images pre-resized with the input pipeline's own resampling (identical network
    # input, tested) while the masks keep the released grid for native scoring.
    "data.builder_config.store_size",
    "data.num_workers",
    "eval.batch_size",
    "eval.num_panels",
    "eval.save_predictions",
    # Extra metrics from a separate compiled function; the train step is untouched (tested).
    "loss.diagnostics_every_steps",
    "parallel.",
)

# Old dotted name -> current name, for configs saved before a rename (`with_defaults`).
RENAMED_FIELDS = {
    # The BuilderConfig's fields and the builder's constructor arguments were two letters apart.
    "data.build_kwargs": "data.builder_config",
    "data.builder_kwargs": "data.builder_options",
}


def is_incidental(key: str) -> bool:
    """Whether the dotted config field `key` leaves a run's numbers unchanged."""
    key = key.removeprefix("config.")
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in INCIDENTAL_FIELDS)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and tuples are compared as lists."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def changed_fields(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted fields that differ, as 'field: saved -> current', sorted, incidental ones included.

    Args:
      saved: a config as JSON (e.g. the one stored with a checkpoint).
      current: the config of this run, as JSON.

    Returns:
      One line per differing field; a field present on one side only counts as differing.
    """
    a, b = flatten(saved), flatten(current)
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, missing), b.get(key, missing)
        if x != y:
            show = lambda v: "<absent>" if v is missing else repr(v)  # noqa: E731
            out.append(f"{key}: {show(x)} -> {show(y)}")
    return out


def computational_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`changed_fields` without the incidental ones: the changes that would mix two runs."""
    return [c for c in changed_fields(saved, current) if not is_incidental(c.split(":", 1)[0])]


def default_config() -> dict[str, Any]:
    """`configs/default.py` of the checkout, as a dict ({} where the package runs without it)."""
    if not DEFAULT_CONFIG_FILE.is_file():
        return {}
    spec = importlib.util.spec_from_file_location("_puseg_default_config", DEFAULT_CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config().to_dict()


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `over`'s values in place of its own, key by key down the nested dicts."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def rename_old_fields(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config (JSON) with the fields of `RENAMED_FIELDS` under their current names.

    Args:
      saved: a config as JSON, possibly written before a field was renamed.

    Returns:
      A copy, each old field moved to its new name (a new name already present is kept and the
      old one dropped).
    """
    out = copy.deepcopy(dict(saved))
    for old, new in RENAMED_FIELDS.items():
        *old_parents, old_leaf = old.split(".")
        *new_parents, new_leaf = new.split(".")
        parent = out
        for key in old_parents:
            parent = parent.get(key) if isinstance(parent, Mapping) else None
        if not isinstance(parent, dict) or old_leaf not in parent:
            continue
        value = parent.pop(old_leaf)
        target = out
        for key in new_parents:
            target = target.setdefault(key, {})
        target.setdefault(new_leaf, value)
    return out


def with_defaults(saved: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A saved config (JSON) with renamed fields under their current names (`RENAMED_FIELDS`)
    and completed with today's defaults for fields it predates.

    Fields are added with the behaviour of the code before them as their default, so a run
    saved before a field existed computed what that default computes.

    Args:
      saved: a config as JSON (a workdir's config.json, a checkpoint's config).

    Returns:
      (the completed config, the dotted names of the fields taken from the defaults).
    """
    saved = rename_old_fields(saved)
    defaults = default_config()
    added = sorted(set(flatten(defaults)) - set(flatten(saved)))
    return _deep_merge(defaults, saved), added
