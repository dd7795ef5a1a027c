"""The speed levers of the train path give the numbers of the plain path: several steps per
compiled call (also through the training loop, with resume), remat, bf16 compute with float32
parameters and optimizer state, and the persistent compilation cache."""

import functools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, random_batches
from tests.conftest import test_config as make_config

# Several steps in one compiled program are the same arithmetic as single steps, but XLA fuses
# the loop body differently (e.g. which multiply-adds become FMAs), so results may differ in the
# last bits: observed 5e-7 relative after 4 steps on the CPU. Anything beyond rounding fails.
ROUNDING = 1e-5

SMALL = {"model.widths": (4, 8), "data.image_size": 16, "loss.num_samples": 2}


def _setup(**overrides):
    import jax

    from puseg_jax.train import config as train_config
    from puseg_jax.train import steps

    config = make_config(**{**SMALL, **overrides})
    info = train_config.validate_config(config)
    model = steps.create_model(config, info)
    host_state = jax.device_get(steps.create_train_state(config, info, model, jax.random.key(0)))
    step_fn = functools.partial(steps.train_step, config=config, label_mode=info.label_mode)
    return config, host_state, step_fn


def _leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# One device runs the same code as eight under 'jit'; both wrappers' batch layouts are covered.
@pytest.mark.parametrize("strategy, devices", [("jit", 8), ("pmap", 8)])
def test_four_steps_per_call_equal_four_single_steps(strategy, devices):
    import jax

    from puseg_jax import parallel

    config, host_state, step_fn = _setup()
    mesh = parallel.create_mesh(devices)
    batches = random_batches(4, config.data.image_size)
    rng = jax.random.key(1)

    single = parallel.wrap_train_step(step_fn, mesh, strategy)
    state, losses = parallel.replicate(host_state, mesh, strategy), []
    for b in batches:
        state, metrics = single(state, parallel.shard_batch(b, mesh, strategy), rng)
        losses.append(float(metrics["loss"]))
    ref = jax.device_get(parallel.unreplicate(state, strategy))

    multi = parallel.wrap_train_step(step_fn, mesh, strategy, steps_per_call=4)
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    state = parallel.replicate(host_state, mesh, strategy)
    state, metrics = multi(state, parallel.shard_batch(stacked, mesh, strategy, True), rng)
    out = jax.device_get(parallel.unreplicate(state, strategy))

    assert metrics["loss"].shape == (4,)
    np.testing.assert_allclose(np.asarray(metrics["loss"]), losses, rtol=ROUNDING)
    assert int(out.step) == int(ref.step) == 4
    # Parameters, BatchNorm statistics and the optimizer state, to float32 rounding.
    _assert_same(
        (out.params, out.batch_stats, out.opt_state), (ref.params, ref.batch_stats, ref.opt_state)
    )


def _assert_same(tree, ref_tree):
    """Every leaf within ROUNDING of the reference leaf's largest magnitude."""
    for a, b in zip(_leaves(tree), _leaves(ref_tree), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert np.max(np.abs(a - b), initial=0.0) <= ROUNDING * np.max(np.abs(b), initial=0.0)


def test_steps_per_call_through_the_loop_and_resume(tiny_workdir, tmp_path, tfds_dir):
    """The session's reference run (configs/test.py: 4 single steps, log/eval/checkpoint every
    2) cut back to its step-2 checkpoint and resumed with 2 steps per call logs, checkpoints and
    ends with the reference's loss and state."""
    from puseg_jax.train import checkpoints, trainer

    def losses(workdir):
        lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
        return {x["step"]: x["train/loss"] for x in lines if "train/loss" in x}

    config = make_config(**{"data.data_dir": tfds_dir, "steps_per_call": 2})
    resumed = str(tmp_path / "resumed")
    shutil.copytree(tiny_workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "last", "4"))
    for name in ("metrics.jsonl", "summary.json"):
        os.remove(os.path.join(resumed, name))
    trainer.train_and_evaluate(config, resumed)

    step_ref, ref = checkpoints.load_state(tiny_workdir)
    assert sorted(losses(resumed)) == [4]
    assert losses(resumed)[4] == pytest.approx(losses(tiny_workdir)[4], rel=ROUNDING)
    step, state = checkpoints.load_state(resumed)
    assert step == step_ref == 4
    _assert_same(state, ref)
    assert os.path.isfile(os.path.join(resumed, "summary.json"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"steps_per_call": 0}, "must be an integer >= 1"),
        ({"steps_per_call": 3}, "log_every_steps=2 is not a multiple of steps_per_call=3"),
    ],
)
def test_steps_per_call_errors(tmp_path, overrides, message):
    from puseg_jax.train import trainer

    with pytest.raises(ValueError, match=message):
        trainer.train_and_evaluate(make_config(**overrides), str(tmp_path))


def _one_step(step_fn, host_state, batch):
    """One train step on one device: (new state on the host, metrics)."""
    import jax

    from puseg_jax import parallel

    mesh = parallel.create_mesh(1)
    step = parallel.wrap_train_step(step_fn, mesh, "jit")
    state = parallel.replicate(host_state, mesh, "jit")
    state, metrics = step(state, parallel.shard_batch(batch, mesh, "jit"), jax.random.key(1))
    return jax.device_get(state), jax.device_get(metrics)


def test_remat_same_parameters_loss_and_gradients():
    import jax

    results = {}
    for remat in (False, True):
        config, host_state, step_fn = _setup(**{"model.remat": remat})
        batch = random_batches(1, config.data.image_size)[0]
        state, metrics = _one_step(step_fn, host_state, batch)
        results[remat] = (host_state.params, state, float(metrics["loss"]))
    (p0, s0, l0), (p1, s1, l1) = results[False], results[True]
    # The same parameter tree (checkpoints are interchangeable) and the same initial values.
    assert jax.tree.structure(p0) == jax.tree.structure(p1)
    assert "DoubleConv_0" in p1 and "DoubleConv_2" in p1
    # Initialised through another program (remat wraps the blocks): equal up to float
    # rounding, while another draw would differ by the weights' own scale.
    for a, b in zip(_leaves(p0), _leaves(p1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # Recomputation changes float rounding at most.
    assert abs(l0 - l1) <= 1e-6
    for a, b in zip(
        _leaves((s0.params, s0.batch_stats)), _leaves((s1.params, s1.batch_stats)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_compute_keeps_float32_parameters_and_optimizer_state():
    import jax
    import jax.numpy as jnp

    config, host_state, step_fn = _setup(**{"model.dtype": "bfloat16"})
    state, metrics = _one_step(step_fn, host_state, random_batches(1, config.data.image_size)[0])
    assert np.isfinite(float(metrics["loss"]))
    for tree in (state.params, state.opt_state, state.batch_stats):
        dtypes = {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
        assert dtypes == {jnp.dtype(jnp.float32)}


def test_compile_cache_dir_is_written_and_reused(tmp_path):
    """trainer.use_compile_cache in a fresh process: the first run writes the cache, the second
    finds its program there (JAX's cache-hit event)."""
    script = (
        "import sys, jax, jax.numpy as jnp\n"
        "from jax import monitoring\n"
        "from puseg_jax.core import compile_cache\n"
        "hits = []\n"
        "monitoring.register_event_listener(lambda e, **k: hits.append(e) if 'cache_hits' in e"
        " else None)\n"
        "jax.jit(lambda x: x + 1)(1.0)  # compiled before the cache is set, as in a notebook\n"
        "compile_cache.use_compile_cache(sys.argv[1])\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
        "jax.block_until_ready(jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(7)))\n"
        "print('HITS', len(hits))\n"
    )
    cache = str(tmp_path / "cache")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    outs = [
        subprocess.run(
            [sys.executable, "-c", script, cache],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout
        for _ in range(2)
    ]
    assert "HITS 0" in outs[0] and os.listdir(cache)
    assert int(outs[1].split("HITS")[1]) >= 1
