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

import dataclasses
import functools
import math
import sys
import threading
from collections.abc import Iterator
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_builders.common import resize_image
from puseg_jax import prepare
from puseg_jax.datasets import DatasetInfo

# Threads that prepare training batches ahead of the train step, and how many batches they may
# hold. grain's defaults (16 threads, 500 elements) would, with one batch per element, fill
# gigabytes at 256x256 while the train step waits for the same two cores.
READ_THREADS = 2
PREFETCH_BATCHES = 4
# Bytes of resized uint8 training examples each process keeps in memory (all source domains
# together): decoding and resizing is ~40% of an example's cost at 64x64.
CACHE_BYTES = 2**30
# Features of builders whose stored `mask` is resampled from the original grid (the prostate
# NIfTI layout): the ground truth on that grid and the spacing of its pixels. Elsewhere the
# stored mask is on the native grid already.
NATIVE_MASK = "native_mask"
NATIVE_SPACING = "native_spacing"


def load_source(
    info: DatasetInfo,
    domain: str,
    split: str,
    data_dir: str,
    build_kwargs: dict | None = None,
    decoders: dict | None = None,
    builder_kwargs: dict | None = None,
):
    """Random-access source of one domain's split.

    Args:
      info: the dataset family.
      domain: the domain (BuilderConfig) to read.
      split: TFDS split, e.g. 'train' or 'test[:50%]'.
      data_dir: the TFDS data dir.
      build_kwargs: BuilderConfig fields the data was built with (`config.data.build_kwargs`).
      decoders: TFDS decoders, e.g. `tfds.decode.SkipDecoding()` for features not needed.
      builder_kwargs: builder constructor arguments (`config.data.builder_kwargs`).

    Returns:
      A sequence of examples, each a dict of numpy arrays (images decoded unless skipped).
    """
    builder = prepare.get_builder(info, domain, data_dir, build_kwargs, builder_kwargs)
    return builder.as_data_source(split=split, decoders=decoders)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """What to open: the recipe of a source rather than the source, so that readers pickle
    into grain's worker processes (a TFDS builder of a registered config does not unpickle)."""

    info: DatasetInfo
    domain: str
    split: str
    data_dir: str
    build_kwargs: dict
    builder_kwargs: dict

    @classmethod
    def from_config(
        cls,
        info: DatasetInfo,
        config: ml_collections.ConfigDict,
        domain: str,
        split: str,
        data_dir: str,
    ) -> "SourceSpec":
        ctor = config.data.get("builder_kwargs")
        return cls(
            info, domain, split, data_dir, _build_kwargs(config), ctor.to_dict() if ctor else {}
        )

    def open(self, decoders: dict | None = None):
        return load_source(
            self.info,
            self.domain,
            self.split,
            self.data_dir,
            self.build_kwargs,
            decoders,
            self.builder_kwargs,
        )


def _build_kwargs(config: ml_collections.ConfigDict) -> dict:
    return config.data.build_kwargs.to_dict() if config.data.build_kwargs else {}


def _as_str(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


# ---------------------------------------------------------------------------------------------
# Reading examples, with 2.5-D neighbours.


def slice_index_map(metadata_source) -> dict[tuple[str, int], int]:
    """(case_id, slice_index) -> record index, for every record of a source.

    Args:
      metadata_source: a source whose image and mask decoding is skipped (reading every record
        is then a protobuf parse, not a PNG decode).

    Returns:
      The map. Two records of one case with the same slice index raise ValueError.
    """
    lookup: dict[tuple[str, int], int] = {}
    for i in range(len(metadata_source)):
        ex = metadata_source[i]
        key = (_as_str(ex["case_id"]), int(ex["slice_index"]))
        if key in lookup:
            raise ValueError(f"Case {key[0]} has two records for slice {key[1]}")
        lookup[key] = i
    return lookup


def neighbour_records(
    lookup: dict[tuple[str, int], int], case_id: str, slice_index: int, context: int
) -> list[int]:
    """Record indices of slices slice_index - context .. slice_index + context of a case.

    A neighbour beyond the volume (or missing from the release) is replaced by the nearest
    slice towards the centre that exists, so the edge slice is repeated at the volume's ends.

    Args:
      lookup: `slice_index_map` of the source.
      case_id: the case.
      slice_index: the centre slice (must exist).
      context: slices on each side.

    Returns:
      2 * context + 1 record indices, from the lowest slice to the highest.
    """
    out = []
    for d in range(-context, context + 1):
        s = slice_index + d
        while (case_id, s) not in lookup:
            s += 1 if d < 0 else -1
        out.append(lookup[(case_id, s)])
    return out


class ExampleReader:
    """Reads record `index` of a source: uint8 image (neighbour slices stacked as channels in
    2.5-D mode), class mask and metadata; with `native`, also the ground truth on its native
    grid.

    The source is opened on first use in each process, so the reader pickles into grain's
    worker processes.
    """

    def __init__(
        self,
        spec: SourceSpec,
        context_slices: int = 0,
        lookup: dict | None = None,
        native: bool = False,
    ):
        if context_slices and lookup is None:
            raise ValueError("2.5-D reading (context_slices > 0) needs the slice lookup")
        self.spec = spec
        self.context_slices = context_slices
        self.lookup = lookup
        self.native = native
        self._source = None
        self._len = None

    @property
    def source(self):
        if self._source is None:
            source = self.spec.open()
            if not self.native and NATIVE_MASK in source.dataset_info.features:
                # Training never looks at the native mask: leave its PNG undecoded.
                source = self.spec.open(decoders={NATIVE_MASK: tfds.decode.SkipDecoding()})
            self._source = source
        return self._source

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _source=None)

    def __len__(self) -> int:
        if self._len is None:
            self._len = len(self.source)
        return self._len

    def __call__(self, index: int) -> dict[str, Any]:
        index = int(index)
        source = self.source
        ex = source[index]
        case_id = _as_str(ex["case_id"])
        image = ex["image"]
        if self.context_slices:
            records = neighbour_records(
                self.lookup, case_id, int(ex["slice_index"]), self.context_slices
            )
            image = np.concatenate(
                [image if j == index else source[j]["image"] for j in records], axis=-1
            )
        out = {
            "image": image,
            "mask": ex["mask"],
            "case_id": case_id,
            "slice_index": int(ex["slice_index"]),
            "num_slices": int(ex["num_slices"]),
            "spacing": np.asarray(ex["spacing"], np.float32),
            "spacing_unit": _as_str(ex["spacing_unit"]),
            "domain": _as_str(ex["domain"]),
        }
        if self.native:
            # Where no native mask is stored, the stored mask is on the native grid.
            out["native_mask"] = ex.get(NATIVE_MASK, ex["mask"])[..., 0]
            out["native_spacing"] = np.asarray(ex.get(NATIVE_SPACING, ex["spacing"]), np.float32)
        return out


def make_reader(
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
    domain: str,
    split: str,
    data_dir: str,
    native: bool = False,
) -> ExampleReader:
    """The `ExampleReader` of one domain's split, with the slice lookup in 2.5-D mode (and the
    native ground truth with `native`)."""
    spec = SourceSpec.from_config(info, config, domain, split, data_dir)
    lookup = None
    if config.data.context_slices:
        skip = {"image": tfds.decode.SkipDecoding(), "mask": tfds.decode.SkipDecoding()}
        lookup = slice_index_map(spec.open(decoders=skip))
    return ExampleReader(spec, config.data.context_slices, lookup, native)


class ResizeCache:
    """A reader's examples at the network's input size, kept in memory up to a byte budget.

    Training visits every record many times; decoding and resizing it once per process is
    enough (the random part of preprocessing comes after). Picklable: each worker process
    fills a cache of its own.
    """

    def __init__(self, reader: ExampleReader, size: int, max_bytes: int):
        self.reader = reader
        self.size = size
        self.max_bytes = max_bytes
        self._cache: dict[int, dict[str, Any]] = {}
        self._bytes = 0

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _cache={}, _bytes=0)

    def __call__(self, index: int) -> dict[str, Any]:
        index = int(index)
        ex = self._cache.get(index)
        if ex is None:
            ex = to_input_size(self.reader(index), self.size)
            nbytes = ex["image"].nbytes + ex["mask"].nbytes
            if self._bytes + nbytes <= self.max_bytes:
                self._cache[index] = ex
                self._bytes += nbytes
        return ex


# ---------------------------------------------------------------------------------------------
# Per-example transforms (NumPy and PIL, run in grain's threads or workers).


def _pil_apply(x: np.ndarray, fn) -> np.ndarray:
    """Applies a PIL image operation to a uint8 [H, W, C] array: 3 channels in one RGB image
    (PIL processes them independently), any other count one grey image per channel."""
    if x.shape[-1] == 3:
        return np.asarray(fn(Image.fromarray(x, "RGB")))
    return np.stack(
        [np.asarray(fn(Image.fromarray(x[..., c], "L"))) for c in range(x.shape[-1])], -1
    )


def resize(x: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """uint8 [H, W, C] -> [size, size, C]: antialiased bilinear for images, nearest for masks
    (the builders' `resize_image`, so stored and on-the-fly resizing agree)."""
    return resize_image(x, size, nearest)


def random_affine(rng: np.random.Generator, aug: ml_collections.ConfigDict, size: int):
    """Random scale, rotation, horizontal flip and shift (the crop's position).

    Returns:
      (A, t): the output -> input map `in = A @ (out - c) + c + t` in PIL's (x, y) pixel
      coordinates (x along columns, pixel centres at +0.5, c the image centre).
    """
    scale = rng.uniform(*aug.scale)
    angle = np.deg2rad(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
    flip = aug.flip and rng.random() < 0.5
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    matrix = np.array([[cos, -sin], [sin, cos]])
    if flip:
        matrix = matrix @ np.diag([-1.0, 1.0])
    shift = rng.uniform(-aug.translate, aug.translate, size=2) * size
    return matrix, shift


def warp(x: np.ndarray, matrix: np.ndarray, shift: np.ndarray, nearest: bool) -> np.ndarray:
    """Applies `random_affine`'s map to a uint8 [S, S, C] array, outside pixels reflected.

    The array is reflect-padded by just the margin the map reaches beyond it, then resampled by
    PIL (bilinear for images, nearest for masks: label values stay in the label set).
    """
    size = x.shape[0]
    centre = np.full(2, size / 2.0)
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64)
    reach = (corners - centre) @ matrix.T + centre + shift
    margin = int(math.ceil(max(0.0, -reach.min(), reach.max() - size))) + 1
    padded = np.pad(x, ((margin, margin), (margin, margin), (0, 0)), mode="reflect")
    offset = centre + shift - matrix @ centre + margin
    data = (matrix[0, 0], matrix[0, 1], offset[0], matrix[1, 0], matrix[1, 1], offset[1])
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return _pil_apply(
        padded, lambda im: im.transform((size, size), Image.AFFINE, data, resample=resample)
    )


def intensity(image: np.ndarray, rng: np.random.Generator, aug: ml_collections.ConfigDict):
    """Gamma, contrast, brightness and noise on an image (never on the mask).

    Args:
      image: uint8 [H, W, C], or float [H, W, C] in [0, 1].
      rng: the example's generator.
      aug: config.augment (gamma: log-gamma range; contrast: +- gain about the mean;
        brightness: +- additive; noise_std: maximum Gaussian noise std), on [0, 1] intensities.

    Returns:
      The augmented float32 image on the [0, 1] scale (not clipped: noise may leave it).
    """
    gamma = np.float32(np.exp(rng.uniform(-aug.gamma, aug.gamma)))
    if image.dtype == np.uint8:
        # A 256-entry table instead of a power per pixel (the bulk of the cost otherwise).
        image = ((np.arange(256, dtype=np.float32) / 255) ** gamma)[image]
    else:
        image = np.clip(image, 0.0, 1.0).astype(np.float32) ** gamma
    # Contrast about the mean and brightness as one affine map: image * gain + offset.
    gain = 1.0 + rng.uniform(-aug.contrast, aug.contrast)
    offset = image.mean() * (1.0 - gain) + rng.uniform(-aug.brightness, aug.brightness)
    image *= np.float32(gain)
    image += np.float32(offset)
    if aug.noise_std > 0:
        image += np.float32(rng.uniform(0, aug.noise_std)) * rng.standard_normal(
            image.shape, np.float32
        )
    return image


def normalization_stats(image: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) per channel for `normalize`, on the [0, 1] scale.

    Args:
      image: uint8 [H, W, C] (statistics from per-channel histograms: exact and ~5x faster than
        reductions over strided float channels), or float [H, W, C] in [0, 1].
      mode: 'zscore' (mean and standard deviation per channel) or 'unit' (0 and 1).

    Returns:
      float32 (shift, scale), each [C].
    """
    channels = image.shape[-1]
    if mode == "unit":
        return np.zeros(channels, np.float32), np.ones(channels, np.float32)
    if mode != "zscore":
        raise ValueError(f"Unknown normalisation {mode!r}")
    flat = image.reshape(-1, channels)
    if image.dtype == np.uint8:
        hist = np.stack([np.bincount(flat[:, c], minlength=256) for c in range(channels)])
        values = np.arange(256) / 255.0
        mean = hist @ values / len(flat)
        var = np.maximum(hist @ values**2 / len(flat) - mean**2, 0.0)
    else:
        mean = flat.mean(axis=0, dtype=np.float64)
        var = np.mean((flat - mean) ** 2, axis=0)
    return mean.astype(np.float32), np.maximum(np.sqrt(var), 1e-6).astype(np.float32)


def normalize(image: np.ndarray, mode: str) -> np.ndarray:
    """'zscore': per image and channel to zero mean, unit variance; 'unit': [0, 1] as is."""
    shift, scale = normalization_stats(image, mode)
    return ((image - shift) / scale).astype(np.float32)


def to_input_size(ex: dict[str, Any], size: int) -> dict[str, Any]:
    """An example with image and mask resized to [size, size] (uint8) and the spacing of one
    network pixel. `spacing` is that of one stored mask pixel, and a network pixel spans
    mask_size / size of them, so distances on the network's grid come out in the stored unit
    (mm, or pixels of the released image). The image may be stored smaller than the mask (the
    fundus builder's `store_size`); each is resized from its own size."""
    image, mask = ex["image"], ex["mask"]
    if image.shape[:2] == mask.shape[:2] == (size, size):
        return ex
    spacing = np.asarray(ex["spacing"], np.float32).copy()
    spacing[:2] *= np.asarray(mask.shape[:2], np.float32) / size
    return dict(
        ex,
        image=resize(image, size, nearest=False),
        mask=resize(mask, size, nearest=True),
        spacing=spacing,
    )


def preprocess(
    ex: dict[str, Any],
    config: ml_collections.ConfigDict,
    rng: np.random.Generator | None,
) -> dict[str, np.ndarray]:
    """Resizes (and, given `rng`, augments) one example to the network's input.

    Args:
      ex: an `ExampleReader` example (or one already passed through `to_input_size`).
      config: the experiment config (data.image_size, data.normalize, augment.*).
      rng: the example's generator; None for evaluation (no augmentation).

    Returns:
      {'image': float32 [S, S, C] normalised, 'mask': int32 [S, S] class indices,
      'spacing': float32 (row, col, slice) size of one network pixel}. Geometric augmentation
      moves image and mask together; intensity augmentation touches the image only.
    """
    ex = to_input_size(ex, config.data.image_size)
    image, mask = ex["image"], ex["mask"]
    augment = rng is not None and config.augment.enabled
    if augment:
        matrix, shift = random_affine(rng, config.augment, config.data.image_size)
        image = warp(image, matrix, shift, nearest=False)
        mask = warp(mask, matrix, shift, nearest=True)
    # Statistics of the image before intensity augmentation: per-image z-scoring after it
    # would undo brightness and contrast exactly (both are affine per channel).
    shift, scale = normalization_stats(image, config.data.normalize)
    if augment:
        image = intensity(image, rng, config.augment)
    else:
        image = image.astype(np.float32) * np.float32(1 / 255)
    image -= shift
    image /= scale
    return {
        "image": image,
        "mask": mask[..., 0].astype(np.int32),
        "spacing": np.asarray(ex["spacing"], np.float32),
    }


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
