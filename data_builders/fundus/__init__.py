"""Fundus optic disc/cup builder (`fundus`), one config per DoFE domain."""

from data_builders.fundus.fundus import Fundus, FundusConfig, fundus_builder

__all__ = ["Fundus", "FundusConfig", "fundus_builder"]
