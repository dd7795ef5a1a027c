"""The loss config's choices and their checks: the methods, the variant fields of the
highlighting (docs/method.md, "Variants"), and `validate_loss_config`.

Kept apart from the losses so that the checks read as one list; `losses` re-exports every name.
"""

from typing import Any

import ml_collections

METHODS = ("erm", "erm_nll", "focal", "topk", "entropy", "ours", "ours_no_highlight")
UNCERTAINTY_HEAD_METHODS = ("ours", "ours_no_highlight")
# The config fields of the highlighted loss of `ours` (docs/method.md, "Variants").
UNCERTAINTY_SOURCES = ("entropy", "sigma", "mc_dropout", "boundary_oracle")
# Sources that answer a question about the method and are never a default: the oracle puts the
# entropy's mean weight on the ground-truth boundary band (docs/method.md, "The oracle").
DIAGNOSTIC_SOURCES = ("boundary_oracle",)
HIGHLIGHT_TERMS = ("ce", "ce+unc", "ce+unc+dice")
HIGHLIGHT_NORMS = ("weighted_mean", "mean")


def num_logvar_channels(config: ml_collections.ConfigDict, num_outputs: int) -> int:
    """Channels of the log-variance head for the configured method.

    Args:
      config: uses `method` and `loss.logvar_head` ('per_class' or 'shared').
      num_outputs: K.

    Returns:
      K, 1, or 0 (no head: the methods without the uncertainty loss).
    """
    if config.method not in UNCERTAINTY_HEAD_METHODS:
        return 0
    heads = {"per_class": num_outputs, "shared": 1}
    if config.loss.logvar_head not in heads:
        raise ValueError(
            f"Unknown loss.logvar_head {config.loss.logvar_head!r}; expected one of {list(heads)}"
        )
    return heads[config.loss.logvar_head]


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {choices}")


def validate_loss_config(config: ml_collections.ConfigDict) -> None:
    """Raises a clear ValueError for a mistake in `method` or the `loss.*` fields.

    Every field is checked whatever the method, so that a typo in a suite-wide override fails
    at once; what depends on the method (MC dropout needs dropout) only where the method uses it.

    Args:
      config: the experiment config (`method`, `loss.*`, `model.dropout_rate`).
    """
    lc = config.loss
    _check_choice("method", config.method, METHODS)
    _check_choice("loss.uncertainty_source", lc.uncertainty_source, UNCERTAINTY_SOURCES)
    _check_choice("loss.highlight_terms", lc.highlight_terms, HIGHLIGHT_TERMS)
    _check_choice("loss.highlight_norm", lc.highlight_norm, HIGHLIGHT_NORMS)
    if not 0.0 <= lc.highlight_top_q <= 1.0:
        raise ValueError(
            f"loss.highlight_top_q={lc.highlight_top_q} must be in [0, 1] "
            "(0 = every pixel highlighted by its U; q = the q most uncertain pixels per image)"
        )
    if lc.lambda_max < 0:
        raise ValueError(f"loss.lambda_max={lc.lambda_max} must be >= 0")
    if lc.ramp_fraction < 0:
        raise ValueError(f"loss.ramp_fraction={lc.ramp_fraction} must be >= 0")
    if not 0.0 <= lc.onset_fraction < 1.0:
        raise ValueError(
            f"loss.onset_fraction={lc.onset_fraction} must be in [0, 1) "
            "(lambda = 0 before onset_fraction * num_train_steps, then the ramp)"
        )
    for name in ("oracle_band_px", "diagnostics_every_steps"):
        value, low = lc[name], 1 if name == "oracle_band_px" else 0
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"loss.{name}={value!r} must be an integer >= {low}")
    if lc.uncertainty_source == "boundary_oracle" and lc.highlight_top_q > 0:
        raise ValueError(
            "loss.uncertainty_source='boundary_oracle' puts the weight on the whole boundary "
            f"band; it does not combine with loss.highlight_top_q={lc.highlight_top_q} (use 0)"
        )
    if not isinstance(lc.mc_passes, int) or lc.mc_passes < 1:
        raise ValueError(f"loss.mc_passes={lc.mc_passes!r} must be an integer >= 1")
    if (
        config.method in UNCERTAINTY_HEAD_METHODS
        and lc.uncertainty_source == "mc_dropout"
        and config.model.dropout_rate <= 0
    ):
        raise ValueError(
            "loss.uncertainty_source='mc_dropout' needs model.dropout_rate > 0 "
            f"(got {config.model.dropout_rate}): the MC passes differ only by their dropout masks"
        )
