"""The real training loop on a tiny config, end to end, and its outputs."""

import json
import os

import pytest

from tests.conftest import test_config


def test_train_and_evaluate_writes_outputs(tiny_workdir):
    summary = json.load(open(os.path.join(tiny_workdir, "summary.json")))
    assert summary["method"] == "ours"
    assert set(summary["evals"]) == {"Domain1", "Domain2", "Domain3"}
    assert summary["evals"]["Domain3"]["role"] == "target"
    for ev in summary["evals"].values():
        for s in ("OD", "OC"):
            assert 0.0 <= ev[s]["dice"] <= 1.0
    for name in ("config.json", "metrics.jsonl"):
        assert os.path.isfile(os.path.join(tiny_workdir, name))
    assert os.listdir(os.path.join(tiny_workdir, "tb"))
    assert os.listdir(os.path.join(tiny_workdir, "checkpoints", "last"))
    d3 = os.path.join(tiny_workdir, "eval", "Domain3")
    for name in ("summary.json", "per_case.csv", "predictions.npz"):
        assert os.path.isfile(os.path.join(d3, name))
    assert any(f.endswith(".png") for f in os.listdir(d3))
    lines = [json.loads(x) for x in open(os.path.join(tiny_workdir, "metrics.jsonl"))]
    train_lines = [x for x in lines if "train/loss" in x]
    assert train_lines and all(x["train/mean_u"] >= 0 for x in train_lines)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "nope"}, "Unknown method"),
        ({"parallel.strategy": "nope"}, "Unknown parallel.strategy"),
        ({"data.target_domains": ("Domain1",)}, "also source"),
        ({"data.source_domains": ("Domain9",)}, "Unknown domain"),
        ({"batch_size": 6}, "not divisible"),
    ],
)
def test_config_errors_before_compiling(tmp_path, overrides, message):
    from puseg_jax import train

    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(test_config(**overrides), str(tmp_path))
