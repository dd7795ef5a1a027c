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
        # Explicit evaluators whose roles do not match the domains (e.g. left over after the
        # domains were overridden on the command line).
        (
            {"evals": {"D3": dict(domain="Domain3", split="test", role="source_val")}},
            "role 'source_val' on 'Domain3', which is not a source",
        ),
        (
            {"evals": {"D1": dict(domain="Domain1", split="test", role="target")}},
            "role 'target' on 'Domain1', which is a source domain",
        ),
        (
            {"evals": {"D1": dict(domain="Domain1", split="test", role="selection")}},
            "unknown role 'selection'",
        ),
    ],
)
def test_config_errors_before_compiling(tmp_path, overrides, message):
    from puseg_jax.train import trainer

    with pytest.raises(ValueError, match=message):
        trainer.train_and_evaluate(test_config(**overrides), str(tmp_path))


def test_resuming_with_a_changed_config_is_refused(tiny_workdir, tmp_path):
    import shutil

    from puseg_jax.train import trainer

    workdir = str(tmp_path / "run")
    shutil.copytree(tiny_workdir, workdir)
    before = open(os.path.join(workdir, "config.json")).read()
    config = test_config(**{"data.data_dir": json.loads(before)["data"]["data_dir"]})
    config.loss.alpha = 2.0
    config.optim.learning_rate = 1e-3
    with pytest.raises(ValueError, match="mix two experiments") as error:
        trainer.train_and_evaluate(config, workdir)
    message = str(error.value)
    assert "loss.alpha: 1.0 -> 2.0" in message and "optim.learning_rate" in message
    assert "allow_config_change" in message
    # Refused before anything was written.
    assert open(os.path.join(workdir, "config.json")).read() == before


def test_resume_check_ignores_incidental_fields_and_can_be_overridden():
    from puseg_jax.core import config_diff
    from puseg_jax.train import config as train_config

    saved = json.loads(test_config().to_json_best_effort())
    current = json.loads(test_config().to_json_best_effort())
    current["log_every_steps"] = 7
    current["parallel"]["num_devices"] = 1
    current["data"]["data_dir"] = "/elsewhere"
    changes = train_config.check_resume_config(saved, current, allow_change=False)
    assert len(changes) == 3 and all(config_diff.is_incidental(c.split(":")[0]) for c in changes)
    current["model"]["widths"] = [4, 8]
    with pytest.raises(ValueError, match=r"model.widths: \[4, 8, 16\] -> \[4, 8\]"):
        train_config.check_resume_config(saved, current, allow_change=False)
    assert len(train_config.check_resume_config(saved, current, allow_change=True)) == 4
    # A checkpoint older than a field computed what the field's default computes: the field
    # is taken at its default (configs/default.py), and only a non-default value is a change.
    older = json.loads(test_config().to_json_best_effort())
    del older["loss"]["highlight_terms"]
    fresh = json.loads(test_config().to_json_best_effort())
    assert train_config.check_resume_config(older, fresh, allow_change=False) == []
    fresh["loss"]["highlight_terms"] = "ce+unc"
    with pytest.raises(ValueError, match=r"loss.highlight_terms: 'ce' -> 'ce\+unc'"):
        train_config.check_resume_config(older, fresh, allow_change=False)
    # A field that only one side has counts as a change.
    del current["model"]["widths"]
    assert config_diff.computational_changes(saved, current) == [
        "model.widths: [4, 8, 16] -> <absent>"
    ]
