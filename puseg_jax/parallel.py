"""Everything about devices and processes: mesh, shardings, the two step wrappers.

The per-device step is written once (in `train.py`) and reduces over the named axis `AXIS`
(gradients with `lax.pmean`, BatchNorm statistics and ratio-of-sums losses with `lax.psum`).
It is wrapped either by
  * 'jit':  `jax.jit(jax.shard_map(step, mesh, ...))`, the batch sharded on the mesh's 'data'
    axis and the state replicated (global `jax.Array`s; scales to multi-host pods), or
  * 'pmap': `jax.pmap(step, axis_name=AXIS)` over the local devices, with a leading device axis
    on state and batch.
Both give the numbers of one device on the same global batch (tests/test_parallel.py).

Multi-process runs (TPU pods, GPU clusters, several CPU processes) use 'jit': every process
feeds its own contiguous block of each global batch (`pipeline.train_dataset` and
`predict.predict_split` cut it), and the mesh lists the devices process by process, so the
blocks concatenated in process order are the global batch one process would have built
(tests/test_multihost.py). 'pmap' maps over one process's devices only.
"""

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"
STRATEGIES = ("jit", "pmap")


def cluster_process_count() -> int:
    """Processes of the job as announced by a cluster launcher (1 when none is detected): an
    `srun` step of SLURM, Open MPI's `mpirun`, or a multi-host Cloud TPU slice."""
    if "SLURM_STEP_ID" in os.environ:  # inside srun, not just an sbatch/salloc shell
        return int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")))
    if "OMPI_COMM_WORLD_SIZE" in os.environ:
        return int(os.environ["OMPI_COMM_WORLD_SIZE"])
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return max(1, len([h for h in hosts.split(",") if h]))


def maybe_initialize_distributed(config) -> None:
    """Calls `jax.distributed.initialize` for multi-process runs (before any JAX computation).

    Explicit coordinates come from the config (`parallel.coordinator_address`, `num_processes`,
    `process_id`, and `cpu_collectives` for several CPU processes). Otherwise, with
    `parallel.distributed='auto'`, a job launched by SLURM (`srun`), Open MPI or on a multi-host
    Cloud TPU slice is initialised by JAX's own detection of that environment; a single process
    is left alone. A second call in the same process (a notebook, tests) does nothing.

    Args:
      config: the experiment config (its `parallel` block).
    """
    pc = config.parallel
    if jax.distributed.is_initialized():
        return
    if pc.coordinator_address:
        if pc.cpu_collectives:
            jax.config.update("jax_cpu_collectives_implementation", pc.cpu_collectives)
        jax.distributed.initialize(
            coordinator_address=pc.coordinator_address,
            num_processes=pc.num_processes,
            process_id=pc.process_id,
        )
    elif pc.distributed == "auto" and cluster_process_count() > 1:
        jax.distributed.initialize()


def check_strategy(strategy: str) -> None:
    """Raises a ValueError for an unknown strategy, or 'pmap' over several processes.

    Args:
      strategy: `config.parallel.strategy`.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown parallel.strategy {strategy!r}; expected one of {STRATEGIES}")
    if strategy == "pmap" and jax.process_count() > 1:
        raise ValueError(
            f"parallel.strategy='pmap' maps over one process's devices; this run has "
            f"{jax.process_count()} processes: use parallel.strategy='jit' (the default)"
        )


def create_mesh(num_devices: int = 0) -> Mesh:
    """1-D mesh ('data') over all devices, or the first `num_devices` (single process only).

    The devices are listed process by process, so that each process's devices hold one
    contiguous block of the batch axis: the block the process feeds (see `shard_batch`).

    Args:
      num_devices: how many devices to use; 0 = all.

    Returns:
      The mesh.
    """
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    if num_devices:
        if jax.process_count() > 1:
            raise ValueError("parallel.num_devices must be 0 (all) for multi-process runs")
        if num_devices > len(devices):
            raise ValueError(f"parallel.num_devices={num_devices} but only {len(devices)} devices")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (AXIS,))


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    """Raises a ValueError unless `batch_size` splits evenly over the mesh's devices."""
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(f"{what}={batch_size} is not divisible by the {n} devices in use")


def local_devices(mesh: Mesh) -> list:
    """This process's devices of the mesh, in mesh order."""
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def replicate(tree: Any, mesh: Mesh, strategy: str) -> Any:
    """Host state -> the layout the wrapped step expects.

    Args:
      tree: one copy of the state (numpy or single-device arrays, the same on every process).
      mesh: the device mesh.
      strategy: 'jit' (replicated global arrays) or 'pmap' (a leading local-device axis).

    Returns:
      The placed state; it may share buffers with `tree`, which the step's donation then
      deletes.
    """
    if strategy == "pmap":
        n = len(local_devices(mesh))
        sharding = NamedSharding(_local_mesh(mesh), P(AXIS))
        return jax.tree.map(
            lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), sharding),
            tree,
        )
    return jax.device_put(tree, NamedSharding(mesh, P()))


def _local_mesh(mesh: Mesh) -> Mesh:
    return Mesh(np.asarray(local_devices(mesh)), (AXIS,))


def unreplicate(tree: Any, strategy: str) -> Any:
    """The wrapped step's state -> one copy: replicated global arrays for 'jit' (what orbax saves
    from every process), the first device's copy for 'pmap'."""
    if strategy == "pmap":
        return jax.tree.map(lambda x: x[0], tree)
    return tree


def shard_batch(
    batch: dict[str, np.ndarray], mesh: Mesh, strategy: str, stacked: bool = False
) -> dict[str, Any]:
    """This process's block of the global batch -> device arrays split on the batch axis.

    Args:
      batch: numpy arrays with batch_size / process_count rows: block `process_index` of the
        global batch; with `stacked`, a leading axis of steps comes first ([steps, rows, ...]).
      mesh: the device mesh (from `create_mesh`).
      strategy: 'jit' (one global jax.Array per key) or 'pmap' ([local_devices, rows, ...], or
        [local_devices, steps, rows, ...] when stacked).
      stacked: the arrays hold the batches of several steps (`wrap_train_step(steps_per_call=k)`).

    Returns:
      The batch placed on the devices.
    """
    if strategy == "pmap":
        n = len(local_devices(mesh))
        sharding = NamedSharding(_local_mesh(mesh), P(AXIS))

        def split(v):
            if not stacked:
                return v.reshape((n, v.shape[0] // n) + v.shape[1:])
            v = v.reshape((v.shape[0], n, v.shape[1] // n) + v.shape[2:])
            return np.swapaxes(v, 0, 1)

        return {k: jax.device_put(split(v), sharding) for k, v in batch.items()}
    sharding = NamedSharding(mesh, P(None, AXIS) if stacked else P(AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def scan_steps(step_fn: Callable) -> Callable:
    """(state, batches, rng) -> (state, stacked metrics): `step_fn` over a stack of batches.

    One compiled call runs several train steps (a `lax.scan` over the leading axis of
    `batches`), which removes the per-step host round trip where steps are short (small models on
    GPU/TPU). Each step is the same computation as a single call of `step_fn`.
    """

    def run(state, batches, rng):
        def body(state, batch):
            return step_fn(state, batch, rng)

        return jax.lax.scan(body, state, batches)

    return run


def wrap_train_step(
    step_fn: Callable,
    mesh: Mesh,
    strategy: str,
    steps_per_call: int = 1,
    compiler_options: dict[str, Any] | None = None,
) -> Callable:
    """Wraps the per-device step for the mesh; the state argument is donated.

    Args:
      step_fn: (state, batch, rng) -> (state, metrics) on one device's rows, reducing over
        `AXIS` (gradients by `lax.pmean`, batch statistics and loss sums by `lax.psum`).
      mesh: the device mesh.
      strategy: 'jit' or 'pmap'.
      steps_per_call: train steps per compiled call; above 1 the wrapped function takes the
        batches of that many steps stacked (`shard_batch(..., stacked=True)`) and returns the
        metrics of each step stacked on a leading axis (see `scan_steps`).

    Returns:
      (state, batch, rng) -> (state, metrics), with the state in the layout of `replicate`, the
      batch from `shard_batch`, and the metrics (identical on every device) as one copy.
    """
    check_strategy(strategy)
    if steps_per_call < 1:
        raise ValueError(f"steps_per_call={steps_per_call} must be >= 1")
    stacked = steps_per_call > 1
    if stacked:
        step_fn = scan_steps(step_fn)
    if strategy == "pmap":
        pmapped = jax.pmap(
            step_fn,
            axis_name=AXIS,
            in_axes=(0, 0, None),
            donate_argnums=(0,),
            devices=local_devices(mesh),
        )

        def run(state, batch, rng):
            state, metrics = pmapped(state, batch, rng)
            return state, jax.tree.map(lambda x: x[0], metrics)

        return run
    # check_vma=False: the step's own collectives keep the state identical on every device
    # (pmean of gradients, psum of batch statistics), as under pmap; with the varying-axes type
    # check on, a custom_vjp whose backward returns this device's share of a replicated input's
    # gradient (conv_ops 'fast') is rejected. Gradients still match one device
    # (tests/test_parallel.py).
    mapped = jax.shard_map(
        step_fn,
        mesh=mesh,
        in_specs=(P(), P(None, AXIS) if stacked else P(AXIS), P()),
        out_specs=(P(), P()),
        check_vma=False,
    )
    return jax.jit(mapped, donate_argnums=(0,), compiler_options=compiler_options)


def wrap_eval_step(
    eval_fn: Callable, mesh: Mesh, strategy: str, compiler_options: dict[str, Any] | None = None
) -> Callable:
    """Wraps eval_fn(state, batch, rng) -> per-example outputs, split on the batch axis.

    Args:
      eval_fn: the per-device evaluation step.
      mesh: the device mesh.
      strategy: 'jit' or 'pmap'.
      compiler_options: XLA options of the compiled step ('jit' only).

    Returns:
      The wrapped step; its outputs have the global batch as leading axis.
    """
    check_strategy(strategy)
    if strategy == "pmap":
        pmapped = jax.pmap(
            eval_fn, axis_name=AXIS, in_axes=(0, 0, None), devices=local_devices(mesh)
        )

        def run(state, batch, rng):
            out = pmapped(state, batch, rng)
            return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)

        return run
    mapped = jax.shard_map(eval_fn, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=P(AXIS))
    return jax.jit(mapped, compiler_options=compiler_options)


def to_host(tree: Any) -> Any:
    """Device outputs -> numpy, gathering the shards of all processes."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


def example_ids(local_batch: int) -> jax.Array:
    """Indices of this device's examples in the global batch (inside a wrapped step)."""
    return jax.lax.axis_index(AXIS) * local_batch + jnp.arange(local_batch)


def sync(name: str) -> None:
    """Barrier across processes (nothing on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def any_across_processes(flag: bool) -> bool:
    """True on every process when `flag` is true on any (a collective: all processes call it at
    the same step, so they all take the same decision there)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
