"""Everything about devices and processes: mesh, shardings, the two step wrappers.

The per-device step is written once (in `train.py`) and reduces over the named axis `AXIS`
(gradients with `lax.pmean`, BatchNorm statistics and ratio-of-sums losses with `lax.psum`).
It is wrapped either by
  * 'jit':  `jax.jit(jax.shard_map(step, mesh, ...))`, the batch sharded on the mesh's 'data'
    axis and the state replicated (global `jax.Array`s; scales to multi-host pods), or
  * 'pmap': `jax.pmap(step, axis_name=AXIS)` over the local devices, with a leading device axis
    on state and batch.
Both give the numbers of one device on the same global batch.
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


def maybe_initialize_distributed(config) -> None:
    """Calls `jax.distributed.initialize` for multi-process runs (before any JAX computation).

    TPU pods and SLURM/Open MPI clusters are auto-detected by JAX (`parallel.distributed='auto'`
    only initialises when such an environment is present); explicit coordinates come from the
    config (`parallel.coordinator_address`, `num_processes`, `process_id`).
    """
    pc = config.parallel
    if pc.coordinator_address:
        if pc.get("cpu_collectives"):
            jax.config.update("jax_cpu_collectives_implementation", pc.cpu_collectives)
        jax.distributed.initialize(
            coordinator_address=pc.coordinator_address,
            num_processes=pc.num_processes,
            process_id=pc.process_id,
        )
    elif pc.distributed == "auto":
        cluster_env = any(
            k in os.environ
            for k in (
                "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS",
            )
        )
        if cluster_env:
            jax.distributed.initialize()


def create_mesh(num_devices: int = 0) -> Mesh:
    """1-D mesh over all devices (or the first `num_devices`; single-process only)."""
    devices = jax.devices()
    if num_devices:
        if jax.process_count() > 1:
            raise ValueError("parallel.num_devices must be 0 (all) for multi-process runs")
        if num_devices > len(devices):
            raise ValueError(f"parallel.num_devices={num_devices} but only {len(devices)} devices")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (AXIS,))


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(f"{what}={batch_size} is not divisible by the {n} devices in use")


def local_devices(mesh: Mesh) -> list:
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def replicate(tree: Any, mesh: Mesh, strategy: str) -> Any:
    """Host state -> the layout the wrapped step expects."""
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
    """The wrapped step's state -> one copy (host-addressable, for saving and evaluation)."""
    if strategy == "pmap":
        return jax.tree.map(lambda x: x[0], tree)
    return tree


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, strategy: str) -> dict[str, Any]:
    """Host-local numpy batch -> device arrays (global over processes for 'jit')."""
    if strategy == "pmap":
        n = len(local_devices(mesh))
        sharding = NamedSharding(_local_mesh(mesh), P(AXIS))
        return {
            k: jax.device_put(v.reshape((n, v.shape[0] // n) + v.shape[1:]), sharding)
            for k, v in batch.items()
        }
    sharding = NamedSharding(mesh, P(AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def wrap_train_step(step_fn: Callable, mesh: Mesh, strategy: str) -> Callable:
    """step_fn(state, batch, rng) -> (state, metrics), per device, reducing over `AXIS`."""
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
    if strategy == "jit":
        mapped = jax.shard_map(
            step_fn, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=(P(), P())
        )
        return jax.jit(mapped, donate_argnums=(0,))
    raise ValueError(f"Unknown parallel.strategy {strategy!r}; expected one of {STRATEGIES}")


def wrap_eval_step(eval_fn: Callable, mesh: Mesh, strategy: str) -> Callable:
    """eval_fn(state, batch, rng) -> per-example outputs (batch-sharded)."""
    if strategy == "pmap":
        pmapped = jax.pmap(
            eval_fn, axis_name=AXIS, in_axes=(0, 0, None), devices=local_devices(mesh)
        )

        def run(state, batch, rng):
            out = pmapped(state, batch, rng)
            return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)

        return run
    mapped = jax.shard_map(eval_fn, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=P(AXIS))
    return jax.jit(mapped)


def to_host(tree: Any) -> Any:
    """Device outputs -> numpy, gathering the shards of all processes."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


def example_ids(local_batch: int) -> jax.Array:
    """Indices of this device's examples in the global batch (inside a wrapped step)."""
    return jax.lax.axis_index(AXIS) * local_batch + jnp.arange(local_batch)


def sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def any_across_processes(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
