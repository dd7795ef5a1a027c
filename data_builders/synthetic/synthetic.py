"""TFDS builders of the synthetic multi-domain datasets: `synth_fundus` and `synth_prostate`.

They share the feature spec of the real builders and go through the same TFDS code path
(`download_and_prepare(file_format="array_record")`, then `tfds.data_source`), but need no
download: every example is drawn by `generator.py` from `(seed, domain, split, index)`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from data_builders.common import encode_png, example_key, segmentation_features
from data_builders.synthetic import generator

_SPLITS = ("train", "test")


def _domain_index(config, domains: list[str]) -> tuple[str, int]:
    """The config's generator domain and its index, the second seed entry."""
    domain = config.domain or config.name
    if domain not in domains:
        raise ValueError(
            f"Unknown synthetic domain {domain!r} in config {config.name!r}; choose one of "
            f"{domains} (as the config name or its `domain` field)."
        )
    return domain, domains.index(domain)


@dataclasses.dataclass(eq=False)
class SynthFundusConfig(tfds.core.BuilderConfig):
    """One fundus camera domain.

    The registered configs are named after their domain. A custom config (tiny test sets, another
    seed) needs a name of its own, which TFDS requires, and names its domain in `domain`.

    Attributes:
      domain: a key of `generator.FUNDUS_DOMAINS`; empty means the config name.
      num_train: images in the train split.
      num_test: images in the test split.
      size: side of the square images in pixels.
      seed: global seed; each image is drawn from `(seed, domain, split, index)`.
    """

    domain: str = ""
    num_train: int = 24
    num_test: int = 12
    size: int = 128
    seed: int = 0


class SynthFundus(tfds.core.GeneratorBasedBuilder):
    """Synthetic fundus optic-disc ROIs from 4 camera domains; mask 0 bg, 1 disc rim, 2 cup."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "1.1.0": "Cameras differ more (Domain1 over-exposed, unevenly lit, magnified), so a "
        "model trained on Domain2-4 meets a domain gap on Domain1; all images change.",
    }
    BUILDER_CONFIGS = [
        SynthFundusConfig(name=name, description=f"Fundus camera domain {name}.")
        for name in generator.FUNDUS_DOMAINS
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=segmentation_features(image_channels=3),
            description=__doc__,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download
        config = self.builder_config
        _domain_index(config, list(generator.FUNDUS_DOMAINS))  # fail before writing anything
        counts = {"train": config.num_train, "test": config.num_test}
        return {split: self._generate_examples(split, n) for split, n in counts.items()}

    def _generate_examples(self, split: str, num_examples: int):
        config = self.builder_config
        domain, domain_index = _domain_index(config, list(generator.FUNDUS_DOMAINS))
        for index in range(num_examples):
            seed = [config.seed, domain_index, _SPLITS.index(split), index]
            image, mask = generator.generate_fundus(seed, domain, config.size)
            case_id = f"{domain}_{split}_{index:04d}"
            yield (
                example_key(case_id, 0),
                {
                    "image": encode_png(image),
                    "mask": encode_png(mask),
                    "case_id": case_id,
                    "slice_index": 0,
                    "num_slices": 1,
                    "spacing": np.ones(3, np.float32),
                    "spacing_unit": "pixel",
                    "domain": domain,
                },
            )


@dataclasses.dataclass(eq=False)
class SynthProstateConfig(tfds.core.BuilderConfig):
    """One MRI site.

    The registered configs are named after their site. A custom config (tiny test sets, another
    seed) needs a name of its own, which TFDS requires, and names its site in `domain`.

    Attributes:
      domain: a key of `generator.PROSTATE_SITES`; empty means the config name.
      num_train: cases (volumes) in the train split.
      num_test: cases (volumes) in the test split.
      num_slices: axial slices per case; each slice is one example.
      size: side of the square slices in pixels.
      seed: global seed; each case is drawn from `(seed, site, split, index)`.
    """

    domain: str = ""
    num_train: int = 4
    num_test: int = 2
    num_slices: int = 12
    size: int = 128
    seed: int = 0


class SynthProstate(tfds.core.GeneratorBasedBuilder):
    """Synthetic T2 prostate volumes from 6 sites, stored slice by slice; mask 0 bg, 1 gland."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        SynthProstateConfig(name=name, description=f"Prostate MRI site {name}.")
        for name in generator.PROSTATE_SITES
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=segmentation_features(image_channels=1),
            description=__doc__,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download
        config = self.builder_config
        _domain_index(config, list(generator.PROSTATE_SITES))  # fail before writing anything
        counts = {"train": config.num_train, "test": config.num_test}
        return {split: self._generate_examples(split, n) for split, n in counts.items()}

    def _generate_examples(self, split: str, num_cases: int):
        config = self.builder_config
        domain, domain_index = _domain_index(config, list(generator.PROSTATE_SITES))
        for index in range(num_cases):
            seed = [config.seed, domain_index, _SPLITS.index(split), index]
            volume, mask, spacing = generator.generate_prostate_volume(
                seed, domain, config.size, config.num_slices
            )
            case_id = f"{domain}_{split}_{index:04d}"
            for z in range(config.num_slices):
                yield (
                    example_key(case_id, z),
                    {
                        "image": encode_png(volume[z]),
                        "mask": encode_png(mask[z]),
                        "case_id": case_id,
                        "slice_index": z,
                        "num_slices": config.num_slices,
                        "spacing": np.asarray(spacing, np.float32),
                        "spacing_unit": "mm",
                        "domain": domain,
                    },
                )
