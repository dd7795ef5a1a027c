"""The checks of a training config: evaluators resolved and validated, the resume check.
Importable without the training loop (the notebook and `evaluate` use it)."""

import json

import ml_collections

from puseg_jax import parallel
from puseg_jax.core import config_diff
from puseg_jax.core.datasets import DatasetInfo, get_dataset_info
from puseg_jax.evaluators import scoring
from puseg_jax.model import losses

# ---------------------------------------------------------------------------------------------
# Config checks, done before anything is built or compiled.


def resolve_evals(config: ml_collections.ConfigDict) -> dict[str, dict]:
    """Named evaluators: `config.evals` if given, else one per source domain (its validation
    split, role 'source_val') and one per target domain (its target split, role 'target')."""
    if len(config.evals):
        return {k: dict(v) for k, v in config.evals.items()}
    evals = {}
    for d in config.data.source_domains:
        evals[d] = dict(domain=d, split=config.data.val_split, role="source_val")
    for d in config.data.target_domains:
        evals[d] = dict(domain=d, split=config.data.target_split, role="target")
    return evals


def validate_config(config: ml_collections.ConfigDict) -> DatasetInfo:
    """Raises a clear ValueError for config mistakes."""
    info = get_dataset_info(config.data.name)
    # The method and every loss field (the highlighting variants, MC dropout's dropout).
    losses.validate_loss_config(config)
    if config.parallel.strategy not in parallel.STRATEGIES:
        raise ValueError(
            f"Unknown parallel.strategy {config.parallel.strategy!r}; "
            f"expected one of {parallel.STRATEGIES}"
        )
    pc = config.parallel
    if pc.distributed not in ("auto", "off"):
        raise ValueError(f"Unknown parallel.distributed {pc.distributed!r}; expected auto | off")
    if pc.coordinator_address and not 0 <= pc.process_id < pc.num_processes:
        raise ValueError(
            f"parallel.process_id={pc.process_id} is not in [0, {pc.num_processes}) "
            f"(parallel.num_processes)"
        )
    extra = tuple(config.data.extra_domains)
    known = info.domains + extra
    for d in list(config.data.source_domains) + list(config.data.target_domains):
        if d not in known:
            raise ValueError(
                f"Unknown domain {d!r} for dataset {config.data.name!r}; expected one of "
                f"{known} (a new domain of your own must be listed in data.extra_domains)"
            )
    overlap = set(config.data.source_domains) & set(config.data.target_domains)
    if overlap:
        raise ValueError(f"Target domain(s) {sorted(overlap)} are also source domains")
    if not config.data.source_domains:
        raise ValueError("data.source_domains is empty")
    size = config.data.image_size
    if size % 2 ** (len(config.model.widths) - 1):
        raise ValueError(
            f"data.image_size={size} must be divisible by 2**{len(config.model.widths) - 1}"
        )
    if config.model_selection not in ("last", "source_val"):
        raise ValueError(f"Unknown model_selection {config.model_selection!r}")
    if config.nan_policy not in ("raise", "skip"):
        raise ValueError(f"Unknown nan_policy {config.nan_policy!r}")
    if config.eval.uncertainty == "mc_dropout" and config.model.dropout_rate <= 0:
        raise ValueError("eval.uncertainty='mc_dropout' needs model.dropout_rate > 0")
    if config.eval.get("resolution", "native") not in scoring.RESOLUTIONS:
        raise ValueError(
            f"Unknown eval.resolution {config.eval.resolution!r}; expected one of "
            f"{scoring.RESOLUTIONS} (native: the released images' or volumes' own grid; "
            "network: the network's input grid, as before)"
        )
    validate_evals(resolve_evals(config), config)
    k = config.steps_per_call
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"steps_per_call={k!r} must be an integer >= 1")
    for name in ("log_every_steps", "checkpoint_every_steps", "eval_every_steps"):
        # Logging, checkpoints and evaluations happen between compiled calls only.
        if config[name] % k:
            raise ValueError(f"{name}={config[name]} is not a multiple of steps_per_call={k}")
    return info


EVAL_ROLES = ("source_val", "target")


def validate_evals(evals: dict[str, dict], config: ml_collections.ConfigDict) -> None:
    """Refuses evaluators whose role does not match the config's domains.

    A 'source_val' evaluator may only read a source domain (its results may choose the
    checkpoint) and a 'target' evaluator only a held-out domain: a config whose domains were
    overridden on the command line while an explicit `config.evals` kept the old roles would
    otherwise select on the target or report a source as the target.
    """
    sources, targets = set(config.data.source_domains), set(config.data.target_domains)
    for name, ev in evals.items():
        missing = {"domain", "split", "role"} - set(ev)
        if missing:
            raise ValueError(f"Evaluator {name!r} lacks {sorted(missing)} (config.evals.{name})")
        role, domain = ev["role"], ev["domain"]
        if role not in EVAL_ROLES:
            raise ValueError(
                f"Evaluator {name!r} has unknown role {role!r}; expected one of {EVAL_ROLES}"
            )
        if role == "source_val" and domain not in sources:
            raise ValueError(
                f"Evaluator {name!r} has role 'source_val' on {domain!r}, which is not a source "
                f"domain {sorted(sources)}: only sources may validate (and choose checkpoints). "
                "Fix config.evals or leave it empty to derive it from data.source_domains and "
                "data.target_domains."
            )
        if role == "target" and domain not in targets:
            where = "a source domain" if domain in sources else "not a target domain"
            raise ValueError(
                f"Evaluator {name!r} has role 'target' on {domain!r}, which is {where} "
                f"(targets {sorted(targets)}). Fix config.evals or leave it empty to derive it "
                "from data.source_domains and data.target_domains."
            )


def _config_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def check_resume_config(saved: dict, current: dict, allow_change: bool) -> list[str]:
    """Compares the config a checkpoint was written with to this run's.

    Args:
      saved: the checkpoint's config (JSON).
      current: this run's config (JSON).
      allow_change: `config.allow_config_change`: resume anyway (the changes are printed).

    Returns:
      Every differing field, incidental ones included (`config_diff.INCIDENTAL_FIELDS`).

    Raises:
      ValueError: a field that changes the computation differs and `allow_change` is False:
        resuming would silently mix two experiments in one workdir.
    """
    # A checkpoint written before a field existed computed what its default computes.
    saved, _ = config_diff.with_defaults(saved)
    changes = config_diff.changed_fields(saved, current)
    computational = config_diff.computational_changes(saved, current)
    if computational and not allow_change:
        raise ValueError(
            "The workdir holds a checkpoint written with another config; resuming would mix two "
            "experiments. Fields that change the computation:\n  "
            + "\n  ".join(computational)
            + "\nUse a new workdir, or pass --config.allow_config_change=True if this is "
            "intended."
        )
    return changes
