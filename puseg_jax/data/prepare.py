"""Builds (once) and opens the TFDS datasets an experiment needs.

`python -m puseg_jax.prepare --config configs/fundus.py:Domain1 --data.manual_dir=...` builds
every domain of the config; training calls `prepare_all` too, so the synthetic default needs no
separate step.
"""

import dataclasses
import hashlib
import json
import os
import time

import ml_collections
import tensorflow_datasets as tfds
from absl import logging

from puseg_jax.core import logging_utils
from puseg_jax.core.datasets import DatasetInfo
from puseg_jax.core.paths import REPO_ROOT


def resolve_data_dir(config: ml_collections.ConfigDict) -> str:
    """config.data.data_dir, else $PUSEG_DATA_DIR, else <repo>/tfds_data."""
    return config.data.data_dir or os.environ.get("PUSEG_DATA_DIR") or str(REPO_ROOT / "tfds_data")


def get_builder(
    info: DatasetInfo,
    domain: str,
    data_dir: str,
    builder_config: dict | None = None,
    builder_options: dict | None = None,
) -> tfds.core.DatasetBuilder:
    """The builder of one domain; a domain not among the builder's configs (a user's own
    hospital) gets a config of the same class with that name. `builder_options` go to the
    builder's constructor (e.g. skip_unpaired=True)."""
    import data_builders  # noqa: F401  (registers the builders)

    cls = tfds.builder_cls(info.builder)
    name = info.builder_config(domain)
    configs = {c.name: c for c in cls.BUILDER_CONFIGS}
    # None means "as the registered config" (lets configs declare overridable fields).
    kwargs = {k: v for k, v in (builder_config or {}).items() if v is not None}
    if name in configs and not kwargs:
        return cls(config=configs[name], data_dir=data_dir, **(builder_options or {}))
    base = configs.get(name, cls.BUILDER_CONFIGS[0])
    fields = {f.name for f in dataclasses.fields(base)}
    # A renamed variant must still read its domain's folder / generate its domain.
    for field in ("domain", "folder"):
        if field in fields and not kwargs.get(field) and not getattr(base, field, None):
            kwargs[field] = name
    if name in configs:
        # TFDS forbids reusing a registered name for other settings: the variant is named by
        # a digest of its fields, so each variant gets its own folder in the data dir.
        digest = hashlib.sha1(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:8]
        cfg = dataclasses.replace(base, name=f"{name}_{digest}", **kwargs)
    else:
        cfg = dataclasses.replace(base, name=name, description=f"User domain {name}.", **kwargs)
    return cls(config=cfg, data_dir=data_dir, **(builder_options or {}))


def prepare_domain(
    info: DatasetInfo,
    domain: str,
    data_dir: str,
    manual_dir: str = "",
    builder_config: dict | None = None,
    builder_options: dict | None = None,
) -> tfds.core.DatasetBuilder:
    """Builds one domain if it is not built yet (array_record, no TensorFlow)."""
    builder = get_builder(info, domain, data_dir, builder_config, builder_options)
    if not builder.is_prepared():
        t0 = time.time()
        logging.info(
            "Building %s/%s into %s ...", info.builder, builder.builder_config.name, data_dir
        )
        print(f"[prepare] building {info.builder}/{builder.builder_config.name} ...", flush=True)
        dl_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
        if not logging_utils.progress_bars():
            tfds.disable_progress_bar()
        # TFDS prints its own banners: the [prepare] lines say the same, so they go to the log.
        with logging_utils.stdout_to_log():
            builder.download_and_prepare(download_config=dl_config, file_format="array_record")
        counts = {k: v.num_examples for k, v in builder.info.splits.items()}
        print(
            f"[prepare] {info.builder}/{builder.builder_config.name}: {counts} "
            f"({time.time() - t0:.1f} s)",
            flush=True,
        )
    return builder


def all_domains(config: ml_collections.ConfigDict) -> list[str]:
    return list(dict.fromkeys(list(config.data.source_domains) + list(config.data.target_domains)))


def prepare_all(config: ml_collections.ConfigDict, info: DatasetInfo) -> str:
    """Builds every domain the config uses; returns the data dir."""
    data_dir = resolve_data_dir(config)
    kwargs = config.data.builder_config.to_dict() if config.data.builder_config else {}
    options = config.data.get("builder_options")
    options = options.to_dict() if options else {}
    for domain in all_domains(config):
        prepare_domain(info, domain, data_dir, config.data.manual_dir, kwargs, options)
    return data_dir


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from puseg_jax.core.datasets import get_dataset_info

    config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)

    def _main(argv):
        del argv
        cfg = flags.FLAGS.config
        print(prepare_all(cfg, get_dataset_info(cfg.data.name)))

    flags.mark_flags_as_required(["config"])
    app.run(_main)
