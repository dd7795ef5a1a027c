"""One per-device step, two wrappers: 'jit' (shard_map over a mesh) and 'pmap' on 8 fake CPU
devices give the loss and parameters of one device on the same global batch, and leave the state
untouched on a non-finite step; config mistakes fail before anything compiles."""

import functools

import numpy as np
import pytest

from tests.conftest import random_batches
from tests.conftest import test_config as make_config

NUM_STEPS = 3
TOLERANCE = 1e-5
# (strategy, devices); the first is the reference.
LAYOUTS = [("jit", 1), ("jit", 8), ("pmap", 8)]


def _run(config, info, host_state, strategy: str, num_devices: int, batches):
    import jax

    from puseg_jax import parallel
    from puseg_jax.train import steps

    mesh = parallel.create_mesh(num_devices)
    step = parallel.wrap_train_step(
        functools.partial(steps.train_step, config=config, label_mode=info.label_mode),
        mesh,
        strategy,
    )
    state = parallel.replicate(host_state, mesh, strategy)
    rng = jax.random.key(1)
    losses = []
    for batch in batches:
        state, metrics = step(state, parallel.shard_batch(batch, mesh, strategy), rng)
        assert bool(metrics["finite_loss"]) and bool(metrics["finite_grads"])
        # The global gradient norm as well as the loss: Adam normalises the update by the
        # gradient's scale, so a wrong gradient scale (e.g. a psum where a pmean belongs) would
        # leave the parameters nearly unchanged and pass a parameters-only comparison.
        losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    final = jax.device_get(parallel.unreplicate(state, strategy))

    # The NaN guard inside the step: a non-finite batch leaves parameters, batch statistics and
    # optimizer state as they were, and only the step counter advances.
    nan_batch = dict(batches[0], image=np.full_like(batches[0]["image"], np.nan))
    state, metrics = step(state, parallel.shard_batch(nan_batch, mesh, strategy), rng)
    assert not bool(metrics["finite_loss"]) and not bool(metrics["finite_grads"])
    after = jax.device_get(parallel.unreplicate(state, strategy))
    assert int(after.step) == int(final.step) + 1
    for a, b in zip(
        jax.tree.leaves((after.params, after.batch_stats, after.opt_state)),
        jax.tree.leaves((final.params, final.batch_stats, final.opt_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    return np.asarray(losses), {"params": final.params, "batch_stats": final.batch_stats}


def _max_diff(a, b) -> float:
    import jax

    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree.leaves(diffs))


# `ours` with every non-default highlighting field at once, MC dropout included: its extra
# passes and the training pass draw dropout masks per example, so the layout must not matter.
OURS_VARIANTS = {
    "loss.lambda_max": 3.0,
    "loss.highlight_terms": "ce+unc+dice",
    "loss.highlight_norm": "mean",
    "loss.uncertainty_source": "mc_dropout",
    "loss.mc_passes": 2,
    "loss.highlight_top_q": 0.3,
    "model.dropout_rate": 0.2,
    "loss.ramp_fraction": 0.0,
}


@pytest.mark.parametrize("method, overrides", [("erm", {}), ("ours", {}), ("ours", OURS_VARIANTS)])
def test_jit_and_pmap_on_8_devices_match_one_device(method, overrides):
    import jax

    from puseg_jax.train import config as train_config
    from puseg_jax.train import steps

    # A two-level U-Net at 16x16 compiles faster; the wrappers do not care about depth.
    config = make_config(
        **{
            "method": method,
            "model.widths": (4, 8),
            "data.image_size": 16,
            "loss.num_samples": 2,
            "num_train_steps": NUM_STEPS,
            **overrides,
        }
    )
    info = train_config.validate_config(config)
    model = steps.create_model(config, info)
    host_state = jax.device_get(steps.create_train_state(config, info, model, jax.random.key(0)))
    batches = random_batches(NUM_STEPS, config.data.image_size)

    runs = {layout: _run(config, info, host_state, *layout, batches) for layout in LAYOUTS}
    ref_losses, ref_vars = runs[LAYOUTS[0]]
    assert np.all(np.isfinite(ref_losses)) and np.all(ref_losses[:, 1] > 0)
    # The steps did train: parameters moved away from their initial values.
    assert _max_diff(ref_vars["params"], host_state.params) > 1e-4
    for layout in LAYOUTS[1:]:
        losses, variables = runs[layout]
        # Loss and gradient norm of each step, relative: the gradient norm is not O(1).
        loss_diff = float(np.max(np.abs(losses - ref_losses) / np.maximum(np.abs(ref_losses), 1)))
        var_diff = _max_diff(variables, ref_vars)
        print(
            f"{method} {sorted(overrides)} {layout} vs 1 device: loss/grad-norm {loss_diff:.2e}, "
            f"params/stats {var_diff:.2e}"
        )
        assert loss_diff <= TOLERANCE, layout
        assert var_diff <= TOLERANCE, layout


# ---------------------------------------------------------------------------------------------


@pytest.fixture
def compile_events():
    """Counts XLA compilations while the test runs."""
    from jax import monitoring

    events = []

    def listener(event: str, duration: float, **kwargs) -> None:
        del duration, kwargs
        if "compile" in event:
            events.append(event)

    monitoring.register_event_duration_secs_listener(listener)
    yield events
    monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 12}, "not divisible by the 8 devices"),
        ({"eval.batch_size": 4}, "eval.batch_size=4 is not divisible"),
        ({"parallel.strategy": "vmap"}, "Unknown parallel.strategy 'vmap'"),
        ({"data.target_domains": ("Domain2",)}, r"\['Domain2'\] are also source"),
        ({"method": "dropout"}, "Unknown method 'dropout'"),
        ({"loss.highlight_terms": "dice"}, "Unknown loss.highlight_terms 'dice'; expected one"),
        ({"loss.highlight_norm": "sum"}, "Unknown loss.highlight_norm 'sum'; expected one"),
        ({"loss.uncertainty_source": "mcd"}, "Unknown loss.uncertainty_source 'mcd'"),
        ({"loss.uncertainty_source": "mc_dropout"}, r"needs model.dropout_rate > 0 \(got 0.0\)"),
        (
            {"method": "ours_no_highlight", "loss.uncertainty_source": "mc_dropout"},
            "needs model.dropout_rate > 0",
        ),
        ({"loss.highlight_top_q": 1.5}, r"loss.highlight_top_q=1.5 must be in \[0, 1\]"),
        ({"loss.mc_passes": 0}, "loss.mc_passes=0 must be an integer >= 1"),
        ({"loss.lambda_max": -1.0}, "loss.lambda_max=-1.0 must be >= 0"),
        ({"data.target_domains": ("Domain7",)}, "Unknown domain 'Domain7'"),
        ({"parallel.distributed": "yes"}, "Unknown parallel.distributed 'yes'"),
        (
            {"parallel.coordinator_address": "h:1", "parallel.process_id": 2},
            r"process_id=2 is not in \[0, 1\)",
        ),
    ],
)
def test_config_errors_raise_before_any_compilation(tmp_path, compile_events, overrides, message):
    from puseg_jax.train import trainer

    with pytest.raises(ValueError, match=message):
        trainer.train_and_evaluate(make_config(**overrides), str(tmp_path))
    assert compile_events == []
    # Nothing was prepared or written either.
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_pmap_is_refused_over_several_processes(monkeypatch):
    import jax

    from puseg_jax import parallel

    parallel.check_strategy("pmap")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="use parallel.strategy='jit'"):
        parallel.check_strategy("pmap")
    parallel.check_strategy("jit")
