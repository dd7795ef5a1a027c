"""The grain input pipeline on tiny synthetic sets: order, resume, mixing, augmentation, 2.5-D,
evaluation padding and process sharding."""

import numpy as np
import pytest

from tests.conftest import test_config as make_config

PROSTATE_KWARGS = {"num_train": 2, "num_test": 2, "num_slices": 6, "size": 32}


def _fundus(tfds_dir, **overrides):
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.data import prepare

    config = make_config(**{"data.data_dir": tfds_dir, **overrides})
    info = get_dataset_info(config.data.name)
    prepare.prepare_all(config, info)
    return config, info


def _prostate(tfds_dir, **overrides):
    return _fundus(
        tfds_dir,
        **{
            "data.name": "synth_prostate",
            "data.source_domains": ("SiteA", "SiteB"),
            "data.target_domains": ("SiteC",),
            "data.builder_config": PROSTATE_KWARGS,
            **overrides,
        },
    )


def _same(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in ("image", "mask", "domain"))


def test_order_is_a_function_of_the_seed(tfds_dir):
    from puseg_jax.data import pipeline

    config, info = _fundus(tfds_dir)
    ds = pipeline.train_dataset(info, config, tfds_dir)
    again = pipeline.train_dataset(info, config, tfds_dir)
    config1, _ = _fundus(tfds_dir, seed=1)
    other = pipeline.train_dataset(info, config1, tfds_dir)
    for step in range(3):
        assert _same(ds[step], again[step])
        assert not np.array_equal(ds[step]["image"], other[step]["image"])
    # Without augmentation an image names its record: each epoch (16 positions, 8 records per
    # domain) visits every record once, in a fresh order.
    config.augment.enabled = False
    plain = pipeline.train_dataset(info, config, tfds_dir)
    epochs = [np.concatenate([plain[2 * e + i]["image"] for i in range(2)]) for e in range(2)]
    assert len({x.tobytes() for x in epochs[0]}) == 16
    assert {x.tobytes() for x in epochs[0]} == {x.tobytes() for x in epochs[1]}
    assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resumed_iterator_sees_the_same_batches(tfds_dir, num_workers):
    from absl import flags

    from puseg_jax.data import pipeline

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    config, info = _fundus(tfds_dir, **{"data.num_workers": num_workers})
    ds = pipeline.train_dataset(info, config, tfds_dir)
    it = pipeline.make_train_iterator(ds, config)
    for _ in range(2):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = pipeline.make_train_iterator(ds, config)
    resumed.set_state(state)
    for batch, want in zip([next(resumed) for _ in range(2)], expected, strict=True):
        assert _same(batch, want)
    # Iterating is random access into the same stream: step i is ds[i].
    assert _same(expected[0], ds[2])


def test_domains_are_mixed_by_weight(tfds_dir):
    from puseg_jax.data import pipeline

    for weights, expected in [((), 0.5), ((3.0, 1.0), 0.75)]:
        config, info = _fundus(tfds_dir, **{"data.domain_weights": weights})
        ds = pipeline.train_dataset(info, config, tfds_dir)
        domains = np.concatenate([ds[i]["domain"] for i in range(8)])
        assert abs(np.mean(domains == "Domain1") - expected) <= 1 / 16
    config, info = _fundus(tfds_dir, **{"data.domain_weights": (1.0,)})
    with pytest.raises(ValueError, match="one positive weight per source domain"):
        pipeline.train_dataset(info, config, tfds_dir)


def _no_geometry(config):
    config.augment.update(scale=(1.0, 1.0), rotate_deg=0.0, flip=False, translate=0.0)


def _no_intensity(config):
    config.augment.update(brightness=0.0, contrast=0.0, gamma=0.0, noise_std=0.0)


def test_augmentation_moves_image_and_mask_together_and_intensity_only_the_image(tfds_dir):
    from puseg_jax.data import sources, transforms

    config, info = _fundus(tfds_dir, **{"data.normalize": "unit"})
    reader = sources.make_reader(info, config, "Domain1", "train", tfds_dir)
    examples = [reader(i) for i in range(len(reader))]
    plain = [transforms.preprocess(ex, config, None) for ex in examples]
    rng = np.random.default_rng(0)

    # Full augmentation: mask values stay class indices present in the label, and it moves.
    augmented = [transforms.preprocess(ex, config, rng) for ex in examples]
    for a, p in zip(augmented, plain, strict=True):
        assert set(np.unique(a["mask"])) <= set(np.unique(p["mask"]))
    assert any(
        not np.array_equal(a["mask"], p["mask"]) for a, p in zip(augmented, plain, strict=True)
    )

    # Intensity only: the mask is untouched, the image changes.
    _no_geometry(config)
    for ex, p in zip(examples, plain, strict=True):
        a = transforms.preprocess(ex, config, rng)
        assert np.array_equal(a["mask"], p["mask"])
        assert not np.allclose(a["image"], p["image"])

    # Brightness survives per-image z-scoring: the statistics come from the image before it.
    config, _ = _fundus(tfds_dir)
    _no_geometry(config)
    config.augment.update(contrast=0.0, gamma=0.0, noise_std=0.0)
    a = transforms.preprocess(examples[0], config, rng)
    shift = a["image"] - transforms.preprocess(examples[0], config, None)["image"]
    assert np.abs(shift).min() > 1e-3 and np.allclose(shift, shift[:1, :1], atol=1e-5)

    # Geometry only, on an image that is the mask drawn in grey: image and mask move together.
    config, _ = _fundus(tfds_dir, **{"data.normalize": "unit"})
    _no_intensity(config)
    agree = []
    for ex in examples:
        drawn = dict(ex, image=np.repeat(ex["mask"] * 100, 3, axis=-1).astype(np.uint8))
        a = transforms.preprocess(drawn, config, rng)
        agree.append(np.mean(np.rint(a["image"][..., 0] * 255 / 100) == a["mask"]))
    # Bilinear resampling blends values only along the label boundaries.
    assert min(agree) > 0.9


def test_two_and_a_half_d_stacks_neighbours_repeating_edge_slices(tfds_dir):
    from puseg_jax.data import pipeline, sources

    assert sources.neighbour_records({("c", 2): 0, ("c", 3): 1, ("c", 5): 2}, "c", 3, 2) == [
        0,
        0,
        1,
        1,
        2,
    ]
    config, info = _prostate(tfds_dir, **{"data.context_slices": 1})
    reader = sources.make_reader(info, config, "SiteA", "train", tfds_dir)
    source = sources.load_source(info, "SiteA", "train", tfds_dir, PROSTATE_KWARGS)
    images = {
        (str(source[i]["case_id"], "utf-8"), int(source[i]["slice_index"])): source[i]["image"]
        for i in range(len(source))
    }
    for i in range(len(source)):
        ex = reader(i)
        case, s, n = ex["case_id"], ex["slice_index"], ex["num_slices"]
        assert ex["image"].shape[-1] == 3
        for c, neighbour in enumerate((max(s - 1, 0), s, min(s + 1, n - 1))):
            assert np.array_equal(ex["image"][..., c], images[(case, neighbour)][..., 0])
    eval_batch = next(pipeline.eval_batches(info, config, "SiteA", "train", tfds_dir, batch_size=4))
    assert eval_batch["image"].shape == (4, 32, 32, 3)


def test_eval_batches_yield_every_example_once_padded_with_valid(tfds_dir):
    from puseg_jax.data import pipeline, sources

    config, info = _prostate(tfds_dir)
    n = len(sources.load_source(info, "SiteC", "test", tfds_dir, PROSTATE_KWARGS))
    assert n % 8  # the last batch is partial
    batches = list(pipeline.eval_batches(info, config, "SiteC", "test", tfds_dir, 8))
    assert len(batches) == -(-n // 8)
    for b in batches:
        assert all(len(v) == 8 for v in b.values())
    valid = np.concatenate([b["valid"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])[valid]
    assert valid.sum() == n and sorted(index.tolist()) == list(range(n))
    keys = {
        (c, s)
        for b in batches
        for c, s, v in zip(b["case_id"], b["slice_index"], b["valid"], strict=True)
        if v
    }
    assert len(keys) == n
    # The ground truth on each example's native grid (here the stored 32x32 slices) rides along.
    (first,) = list(pipeline.eval_batches(info, config, "SiteC", "test", tfds_dir, n, True))
    assert first["native_mask"].dtype == object and first["native_mask"][0].shape == (32, 32)
    np.testing.assert_array_equal(np.stack(list(first["native_mask"])), first["mask"])
    assert (first["native_shape"] == 32).all() and first["native_spacing"].shape == (n, 3)


def test_process_shards_concatenate_to_the_global_batch(tfds_dir):
    from puseg_jax.data import pipeline

    config, info = _fundus(tfds_dir)
    whole = pipeline.train_dataset(info, config, tfds_dir)
    parts = [pipeline.train_dataset(info, config, tfds_dir, p, 2) for p in range(2)]
    for step in range(3):
        local = [part[step] for part in parts]
        assert all(len(b["image"]) == config.batch_size // 2 for b in local)
        joined = {k: np.concatenate([b[k] for b in local]) for k in local[0]}
        assert _same(joined, whole[step])


def test_epoch_shuffle_is_thread_safe_and_picklable():
    """grain reads with several threads; a shared permutation cache must not race."""
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    from puseg_jax.data.pipeline import EpochShuffle

    shuffle = EpochShuffle(num_records=7, seed=3)
    positions = list(range(7 * 40)) * 3
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(shuffle, positions))
    reference = EpochShuffle(num_records=7, seed=3)
    assert got == [reference(p) for p in positions]
    for epoch in range(40):
        assert sorted(got[7 * epoch : 7 * epoch + 7]) == list(range(7))
    clone = pickle.loads(pickle.dumps(shuffle))
    assert [clone(p) for p in range(21)] == got[:21]
