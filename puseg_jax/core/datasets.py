"""What the code needs to know about each dataset family, by name (`config.data.name`).

Each family is one TFDS builder with one BuilderConfig per domain (site, camera). The label
convention lives here: the stored class mask and how the network's outputs map onto it.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """A dataset family.

    Attributes:
      builder: TFDS builder name.
      domains: the domains (BuilderConfig names) of the public release.
      label_mode: 'sigmoid' (nested multi-label channels) or 'softmax' (exclusive classes).
      structures: evaluated structures; in sigmoid mode structure k is (mask > k).
      channels: image channels stored by the builder.
      volumetric: cases are volumes re-stacked from slices (metrics in 3-D).
      config_suffix: appended to a domain to get its BuilderConfig name.
    """

    builder: str
    domains: tuple[str, ...]
    label_mode: str
    structures: tuple[str, ...]
    channels: int
    volumetric: bool
    config_suffix: str = ""

    @property
    def num_outputs(self) -> int:
        """Channels of the logit head."""
        n = len(self.structures)
        return n if self.label_mode == "sigmoid" else n + 1

    def builder_config(self, domain: str) -> str:
        return domain + self.config_suffix


FUNDUS_DOMAINS = ("Domain1", "Domain2", "Domain3", "Domain4")
PROSTATE_SITES = ("RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK")
SYNTH_PROSTATE_SITES = ("SiteA", "SiteB", "SiteC", "SiteD", "SiteE", "SiteF")

DATASETS: dict[str, DatasetInfo] = {
    "fundus": DatasetInfo("fundus", FUNDUS_DOMAINS, "sigmoid", ("OD", "OC"), 3, False),
    # The SAML NIfTI release (volumes with spacing in mm).
    "prostate": DatasetInfo("prostate", PROSTATE_SITES, "softmax", ("prostate",), 1, True),
    # The ProstateSlice PNG release (2-D slices of volumes, spacing unknown).
    "prostate_slices": DatasetInfo(
        "prostate", PROSTATE_SITES, "softmax", ("prostate",), 1, True, config_suffix="_slices"
    ),
    "synth_fundus": DatasetInfo("synth_fundus", FUNDUS_DOMAINS, "sigmoid", ("OD", "OC"), 3, False),
    "synth_prostate": DatasetInfo(
        "synth_prostate", SYNTH_PROSTATE_SITES, "softmax", ("prostate",), 1, True
    ),
}


def get_dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name]
