"""Input pipeline: grain over `tfds.data_source`, joint augmentation, source mixing, eval padding.

Training data order is a pure function of (seed, position in the stream): every source domain
visits its records in a fresh permutation each epoch, drawn from (seed, domain, epoch), the
domains are interleaved with fixed weights, and each example's augmentation is drawn from a
generator seeded by (seed, position). The iterator's state is therefore just its position,
which is checkpointed, so a resumed run sees exactly the batches it would have seen.

With P processes, the global batch i is the stream's positions [i * B, (i + 1) * B) and process
p takes the contiguous block [i * B + p * B / P, i * B + (p + 1) * B / P) of it. The processes'
local batches, concatenated in process order, are exactly the global batch one process would
have built, in the same order, with the same augmentation (the order in which
`jax.make_array_from_process_local_data` assembles them on a 1-D mesh).

Evaluation reads every example of a split once, in the source's order, and pads the last batch
with copies flagged `valid = False`; it never looks at a label to decide what to read. Beside
the network's input it carries each example's ground truth on its native grid (the released
image or the original volume's slice), which evaluation scores on.
"""

import functools
import sys
import threading
from collections.abc import Iterator
from typing import Any

import grain
import ml_collections
import numpy as np

from puseg_jax.core.datasets import DatasetInfo
from puseg_jax.data.sources import CACHE_BYTES, READ_THREADS, ResizeCache, make_reader
from puseg_jax.data.transforms import preprocess

PREFETCH_BATCHES = 4


def _train_transform(ex: dict[str, Any], rng: np.random.Generator, *, config) -> dict:
    out = preprocess(ex, config, rng)
    # Each example's source domain, so that mixing can be checked and logged.
    out["domain"] = ex["domain"]
    return out


# ---------------------------------------------------------------------------------------------
# Training.


def domain_seed(seed: int, domain_index: int) -> int:
    """Shuffle seed of one source domain: independent streams per (seed, domain)."""
    return int(np.random.SeedSequence([seed, domain_index]).generate_state(1)[0])


class EpochShuffle:
    """Stream position -> record index: epoch e visits every record once, in a permutation
    drawn from (seed, e). (grain's `shuffle` does the same with a per-index Feistel network,
    ~3 ms an index here; one NumPy permutation per epoch costs microseconds.)"""

    def __init__(self, num_records: int, seed: int):
        self.num_records = num_records
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}
        # grain reads with several threads: the cache is shared, so guard it.
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # worker processes get their own cache and lock
        return {"num_records": self.num_records, "seed": self.seed}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["num_records"], state["seed"])

    def permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                if len(self._cache) >= 4:  # threads read neighbouring epochs at most
                    self._cache.pop(min(self._cache))
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_records)
                self._cache[epoch] = perm
            return perm

    def __call__(self, position: int) -> int:
        epoch, i = divmod(int(position), self.num_records)
        return int(self.permutation(epoch)[i])


def train_dataset(
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
    data_dir: str,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Infinite MapDataset of this process's training batches; element i is for step i + 1.

    Args:
      info: the dataset family.
      config: the experiment config (data.*, augment.*, batch_size, seed).
      data_dir: the TFDS data dir.
      process_index: this process.
      process_count: processes sharing each global batch.

    Returns:
      Batches {'image' [b, S, S, C] float32, 'mask' [b, S, S] int32, 'spacing' [b, 3],
      'domain' [b]} with b = batch_size / process_count.
    """
    domains = list(config.data.source_domains)
    weights = list(config.data.get("domain_weights") or [1.0] * len(domains))
    if len(weights) != len(domains) or min(weights) <= 0:
        raise ValueError(
            f"data.domain_weights {weights} must hold one positive weight per source domain "
            f"{domains}"
        )
    per_domain = []
    for i, domain in enumerate(domains):
        reader = make_reader(info, config, domain, config.data.train_split, data_dir)
        if len(reader) == 0:
            raise ValueError(f"Source domain {domain} has no '{config.data.train_split}' examples.")
        order = EpochShuffle(len(reader), domain_seed(config.seed, i))
        cached = ResizeCache(reader, config.data.image_size, CACHE_BYTES // len(domains))
        per_domain.append(grain.MapDataset.range(sys.maxsize).map(order).map(cached))
    ds = grain.MapDataset.mix(per_domain, weights=weights)
    ds = ds.random_map(functools.partial(_train_transform, config=config), seed=config.seed)
    global_batch = config.batch_size
    if global_batch % process_count:
        raise ValueError(f"batch_size {global_batch} not divisible by {process_count} processes")
    # Blocks of local_batch consecutive positions; process p takes every P-th block starting at
    # p, so the blocks of one step are the global batch in process order.
    local_batch = global_batch // process_count
    ds = ds.batch(local_batch, drop_remainder=True)
    return ds[process_index::process_count]


def make_train_iterator(
    dataset: grain.MapDataset,
    config: ml_collections.ConfigDict,
    num_threads: int = READ_THREADS,
    prefetch_batches: int = PREFETCH_BATCHES,
):
    """An iterator over `train_dataset` with get_state()/set_state().

    Args:
      dataset: `train_dataset`'s output.
      config: the experiment config; `data.num_workers > 0` prepares batches in that many
        worker processes (grain's mp_prefetch; absl flags must be parsed, and the main module
        needs an `if __name__ == "__main__"` guard), else in threads of this process.
      num_threads: threads preparing batches (in each worker when there are workers).
      prefetch_batches: batches prepared ahead per thread pool.

    Returns:
      The iterator; its state is the position in the stream, so `set_state` resumes exactly.
    """
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
    it_ds = dataset.to_iter_dataset(read_options)
    if config.data.num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
    return iter(it_ds)


# ---------------------------------------------------------------------------------------------
# Evaluation.


def eval_batches(
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
    domain: str,
    split: str,
    data_dir: str,
    batch_size: int,
    native_masks: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example of (domain, split) exactly once, in the source's order, in full batches.

    The last batch is padded with copies of its first example flagged `valid = False`: every
    batch has the shape the compiled step expects, and nothing is dropped.

    Args:
      info: the dataset family.
      config: the experiment config (data.image_size, data.normalize, data.context_slices).
      domain: the domain.
      split: its split.
      data_dir: the TFDS data dir.
      batch_size: global evaluation batch.
      native_masks: also yield each example's ground truth on its native grid.

    Yields:
      {'image', 'mask', 'spacing' (network grid), 'valid', 'index' (record index), 'case_id',
      'slice_index', 'num_slices', 'spacing_unit', 'native_shape' [b, 2] and 'native_spacing'
      [b, 3] (the native grid: the released image, or the original volume's slice), and with
      `native_masks` 'native_mask' (an object array of uint8 [h, w] class masks, sizes may
      differ between examples)}, each with batch_size rows.
    """
    reader = make_reader(info, config, domain, split, data_dir, native=True)
    n = len(reader)
    for start in range(0, n, batch_size):
        rows = []
        for i in range(start, min(start + batch_size, n)):
            ex = reader(i)
            row = preprocess(ex, config, rng=None)
            row.update(
                valid=True,
                index=i,
                case_id=ex["case_id"],
                slice_index=ex["slice_index"],
                num_slices=ex["num_slices"],
                spacing_unit=ex["spacing_unit"],
                native_shape=np.asarray(ex["native_mask"].shape, np.int32),
                native_spacing=ex["native_spacing"],
            )
            if native_masks:
                row["native_mask"] = ex["native_mask"]
            rows.append(row)
        rows += [dict(rows[0], valid=False)] * (batch_size - len(rows))
        yield {k: _stack([r[k] for r in rows], ragged=k == "native_mask") for k in rows[0]}


def _stack(values: list, ragged: bool) -> np.ndarray:
    """np.stack, or a 1-D object array of the values when their shapes may differ."""
    if not ragged:
        return np.stack(values)
    out = np.empty(len(values), object)
    for i, v in enumerate(values):  # item by item: equal shapes must not broadcast
        out[i] = v
    return out
