"""Input pipeline: grain over `tfds.data_source`, joint augmentation, source mixing, eval padding.

Training data order is a pure function of (seed, position): every domain is shuffled per epoch
with its own seed, the domains are mixed with fixed weights, and each example's augmentation is
drawn from a generator seeded by its position. The iterator's state is therefore just its
position, which is checkpointed, so a resumed run sees exactly the batches it would have seen.

With several processes, process p takes positions p, p + P, p + 2P, ... of the global stream, so
the union of the processes' local batches at step i is the same set of examples that one
process would have put in global batch i.
"""

import dataclasses
from collections.abc import Iterator
from typing import Any

import grain
import ml_collections
import numpy as np
from PIL import Image
from scipy import ndimage

from puseg_jax import prepare
from puseg_jax.datasets import DatasetInfo


def load_source(
    info: DatasetInfo, domain: str, split: str, data_dir: str, build_kwargs: dict | None = None
):
    """Random-access source of one domain's split (decoded dicts of numpy arrays)."""
    return prepare.get_builder(info, domain, data_dir, build_kwargs).as_data_source(split=split)


def _build_kwargs(config: ml_collections.ConfigDict) -> dict:
    return config.data.build_kwargs.to_dict() if config.data.build_kwargs else {}


# ---------------------------------------------------------------------------------------------
# Per-example transforms (NumPy, run in grain).


def _as_str(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _resize(image: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """[H, W, C] -> [size, size, C]; antialiased bilinear for images, nearest for masks."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    resample = Image.NEAREST if nearest else Image.BILINEAR
    chans = [
        np.asarray(Image.fromarray(image[..., c]).resize((size, size), resample))
        for c in range(image.shape[-1])
    ]
    return np.stack(chans, axis=-1)


def _affine_params(rng: np.random.Generator, aug: ml_collections.ConfigDict, size: int):
    """Random scale, rotation, flip and translation (crop position), as an output->input map."""
    scale = rng.uniform(*aug.scale)
    angle = np.deg2rad(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
    flip = aug.flip and rng.random() < 0.5
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    matrix = np.array([[cos, -sin], [sin, cos]])
    if flip:
        matrix = matrix @ np.diag([1.0, -1.0])
    shift = rng.uniform(-aug.translate, aug.translate, size=2) * size
    centre = (size - 1) / 2.0
    offset = centre - matrix @ (np.full(2, centre) + shift)
    return matrix, offset


def _warp(x: np.ndarray, matrix, offset, order: int) -> np.ndarray:
    out = [
        ndimage.affine_transform(x[..., c], matrix, offset, order=order, mode="reflect")
        for c in range(x.shape[-1])
    ]
    return np.stack(out, axis=-1)


def _intensity(image: np.ndarray, rng: np.random.Generator, aug: ml_collections.ConfigDict):
    """Brightness, contrast, gamma and noise on an image in [0, 1] (never on the mask)."""
    image = np.clip(image, 0.0, 1.0) ** np.exp(rng.uniform(-aug.gamma, aug.gamma))
    mean = image.mean()
    image = (image - mean) * (1.0 + rng.uniform(-aug.contrast, aug.contrast)) + mean
    image = image + rng.uniform(-aug.brightness, aug.brightness)
    if aug.noise_std > 0:
        image = image + rng.normal(0.0, rng.uniform(0, aug.noise_std), image.shape)
    return image.astype(np.float32)


def normalize(image: np.ndarray, mode: str) -> np.ndarray:
    """'zscore': per image and channel to zero mean, unit variance; 'unit': [0, 1] as is."""
    if mode == "zscore":
        mean = image.mean(axis=(0, 1), keepdims=True)
        std = image.std(axis=(0, 1), keepdims=True)
        return ((image - mean) / np.maximum(std, 1e-6)).astype(np.float32)
    if mode == "unit":
        return image.astype(np.float32)
    raise ValueError(f"Unknown normalisation {mode!r}")


@dataclasses.dataclass
class ExampleReader:
    """Reads example `index` of a source as a float image (with 2.5-D neighbours) and mask."""

    source: Any
    context_slices: int = 0  # slices on each side stacked as channels (2.5-D)
    _index: dict | None = None

    def _neighbour_index(self) -> dict:
        # Built lazily, once per worker: (case_id, slice_index) -> record index.
        if self._index is None:
            self._index = {}
            for i in range(len(self.source)):
                ex = self.source[i]
                self._index[(_as_str(ex["case_id"]), int(ex["slice_index"]))] = i
        return self._index

    def __call__(self, index: int) -> dict[str, Any]:
        ex = self.source[int(index)]
        image = ex["image"]
        if self.context_slices:
            lookup = self._neighbour_index()
            case, s, n = _as_str(ex["case_id"]), int(ex["slice_index"]), int(ex["num_slices"])
            stack = []
            for d in range(-self.context_slices, self.context_slices + 1):
                # At the volume's ends the edge slice is repeated.
                j = lookup.get((case, int(np.clip(s + d, 0, n - 1))), int(index))
                stack.append(self.source[j]["image"] if j != index else image)
            image = np.concatenate(stack, axis=-1)
        return {
            "image": image,
            "mask": ex["mask"],
            "case_id": _as_str(ex["case_id"]),
            "slice_index": int(ex["slice_index"]),
            "spacing": np.asarray(ex["spacing"], np.float32),
            "spacing_unit": _as_str(ex["spacing_unit"]),
            "domain": _as_str(ex["domain"]),
        }


def preprocess(
    ex: dict[str, Any],
    config: ml_collections.ConfigDict,
    rng: np.random.Generator | None,
) -> dict[str, np.ndarray]:
    """Resize (and augment when `rng` is given) one example to the network's input."""
    size = config.data.image_size
    orig_shape = ex["image"].shape[:2]
    image = _resize(ex["image"], size, nearest=False).astype(np.float32) / 255.0
    mask = _resize(ex["mask"], size, nearest=True)
    if rng is not None and config.augment.enabled:
        matrix, offset = _affine_params(rng, config.augment, size)
        image = _warp(image, matrix, offset, order=1)
        mask = _warp(mask, matrix, offset, order=0)
        image = _intensity(image, rng, config.augment)
    # Distances are reported on the stored grid: one network pixel spans orig/size stored ones.
    spacing = ex["spacing"].copy()
    spacing[:2] *= np.asarray(orig_shape, np.float32) / size
    return {
        "image": normalize(image, config.data.normalize),
        "mask": mask[..., 0].astype(np.int32),
        "spacing": spacing,
    }


# ---------------------------------------------------------------------------------------------
# Datasets.


def train_dataset(
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
    data_dir: str,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Infinite MapDataset of local training batches (random access: position = step)."""
    domains = list(config.data.source_domains)
    weights = config.data.get("domain_weights") or [1.0] * len(domains)
    per_domain = []
    for i, domain in enumerate(domains):
        src = load_source(info, domain, config.data.train_split, data_dir, _build_kwargs(config))
        if len(src) == 0:
            raise ValueError(f"Source domain {domain} has no '{config.data.train_split}' examples.")
        reader = ExampleReader(src, config.data.context_slices)
        ds = grain.MapDataset.range(len(src)).shuffle(seed=config.seed * 1009 + i).repeat()
        per_domain.append(ds.map(reader))
    ds = grain.MapDataset.mix(per_domain, weights=weights)
    ds = ds.random_map(lambda ex, rng: preprocess(ex, config, rng), seed=config.seed)
    global_batch = config.batch_size
    if global_batch % process_count:
        raise ValueError(f"batch_size {global_batch} not divisible by {process_count} processes")
    ds = ds[process_index::process_count]
    return ds.batch(global_batch // process_count, drop_remainder=True)


def make_train_iterator(dataset: grain.MapDataset, config: ml_collections.ConfigDict):
    """An iterator with get_state()/set_state(); worker processes when configured."""
    it_ds = dataset.to_iter_dataset()
    if config.data.num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
    return iter(it_ds)


def eval_batches(
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
    domain: str,
    split: str,
    data_dir: str,
    batch_size: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example of (domain, split) exactly once, in fixed order, padded to full batches.

    Yields dicts with 'image', 'mask', 'spacing', 'valid' (False on padding rows) and the
    metadata 'case_id', 'slice_index'.
    """
    src = load_source(info, domain, split, data_dir, _build_kwargs(config))
    reader = ExampleReader(src, config.data.context_slices)
    n = len(src)
    for start in range(0, n, batch_size):
        rows = []
        for i in range(start, min(start + batch_size, n)):
            ex = reader(i)
            out = preprocess(ex, config, rng=None)
            out.update(
                case_id=ex["case_id"],
                slice_index=ex["slice_index"],
                valid=True,
                spacing_unit=ex["spacing_unit"],
            )
            rows.append(out)
        num_valid = len(rows)
        while len(rows) < batch_size:  # padding copies a real row, flagged invalid
            rows.append(dict(rows[0], valid=False))
        batch = {k: np.stack([r[k] for r in rows]) for k in ("image", "mask", "spacing", "valid")}
        batch["case_id"] = np.array([r["case_id"] for r in rows[:num_valid]], dtype=object)
        batch["slice_index"] = np.array([r["slice_index"] for r in rows[:num_valid]])
        batch["spacing_unit"] = np.array([r["spacing_unit"] for r in rows[:num_valid]])
        yield batch
