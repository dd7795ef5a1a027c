"""Reading the prepared TFDS domains: sources, records of slices and their neighbours, and a
thread-safe reader with a resize cache."""

import dataclasses
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from puseg_jax.core.datasets import DatasetInfo
from puseg_jax.data import prepare
from puseg_jax.data.transforms import to_input_size

# Threads that prepare training batches ahead of the train step, and how many batches they may
# hold. grain's defaults (16 threads, 500 elements) would, with one batch per element, fill
# gigabytes at 256x256 while the train step waits for the same two cores.
READ_THREADS = 2

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
    builder_config: dict | None = None,
    decoders: dict | None = None,
    builder_options: dict | None = None,
):
    """Random-access source of one domain's split.

    Args:
      info: the dataset family.
      domain: the domain (BuilderConfig) to read.
      split: TFDS split, e.g. 'train' or 'test[:50%]'.
      data_dir: the TFDS data dir.
      builder_config: BuilderConfig fields the data was built with (`config.data.builder_config`).
      decoders: TFDS decoders, e.g. `tfds.decode.SkipDecoding()` for features not needed.
      builder_options: builder constructor arguments (`config.data.builder_options`).

    Returns:
      A sequence of examples, each a dict of numpy arrays (images decoded unless skipped).
    """
    builder = prepare.get_builder(info, domain, data_dir, builder_config, builder_options)
    return builder.as_data_source(split=split, decoders=decoders)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """What to open: the recipe of a source rather than the source, so that readers pickle
    into grain's worker processes (a TFDS builder of a registered config does not unpickle)."""

    info: DatasetInfo
    domain: str
    split: str
    data_dir: str
    builder_config: dict
    builder_options: dict

    @classmethod
    def from_config(
        cls,
        info: DatasetInfo,
        config: ml_collections.ConfigDict,
        domain: str,
        split: str,
        data_dir: str,
    ) -> "SourceSpec":
        options = config.data.get("builder_options")
        options = options.to_dict() if options else {}
        return cls(info, domain, split, data_dir, _builder_config(config), options)

    def open(self, decoders: dict | None = None):
        return load_source(
            self.info,
            self.domain,
            self.split,
            self.data_dir,
            self.builder_config,
            decoders,
            self.builder_options,
        )


def _builder_config(config: ml_collections.ConfigDict) -> dict:
    return config.data.builder_config.to_dict() if config.data.builder_config else {}


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
