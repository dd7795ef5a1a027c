"""Prostate MRI builder (`prostate`), one config per site and release layout."""

from data_builders.prostate.prostate import Prostate, ProstateConfig, prostate_builder

__all__ = ["Prostate", "ProstateConfig", "prostate_builder"]
