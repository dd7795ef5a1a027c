"""The real training loop on a tiny config, end to end, and its outputs."""

import json
import os

import pytest

from tests.conftest import test_config


def test_train_and_evaluate_writes_outputs(tiny_workdir):
    import csv

    import numpy as np

    summary = json.load(open(os.path.join(tiny_workdir, "summary.json")))
    assert (summary["method"], summary["checkpoint"], summary["step"]) == ("ours", "last", 4)
    roles = {name: ev["role"] for name, ev in summary["evals"].items()}
    assert roles == {"Domain1": "source_val", "Domain2": "source_val", "Domain3": "target"}
    for name in ("config.json", "metrics.jsonl"):
        assert os.path.isfile(os.path.join(tiny_workdir, name))
    assert os.listdir(os.path.join(tiny_workdir, "tb"))
    assert os.listdir(os.path.join(tiny_workdir, "checkpoints", "last"))
    for name, ev in summary["evals"].items():
        folder = os.path.join(tiny_workdir, "eval", name)
        for file in ("summary.json", "per_case.csv", "predictions.npz"):
            assert os.path.isfile(os.path.join(folder, file))
        with open(os.path.join(folder, "per_case.csv")) as f:
            rows = list(csv.DictReader(f))
        # The summary's Dice is the mean over the cases of the per-case table (4 test images).
        assert ev["num_cases"] == 4
        for s in ("OD", "OC"):
            dice = [float(r["dice"]) for r in rows if r["structure"] == s]
            assert len(dice) == ev[s]["n"] == 4
            assert ev[s]["dice"] == pytest.approx(np.mean(dice), abs=1e-12)
    assert any(
        f.endswith(".png") for f in os.listdir(os.path.join(tiny_workdir, "eval", "Domain3"))
    )

    lines = [json.loads(x) for x in open(os.path.join(tiny_workdir, "metrics.jsonl"))]
    train = {x["step"]: x for x in lines if "train/loss" in x}
    assert sorted(train) == [2, 4]  # log_every_steps=2 of 4 steps
    for x in train.values():
        # 'ours' minimises L_seg + dice_weight * L_dice + alpha * L_unc (both weights 1 in
        # configs/test.py); the window means keep that linear relation only if every scalar
        # is averaged over the same steps.
        assert x["train/loss"] == pytest.approx(
            x["train/loss_seg"] + x["train/loss_dice"] + x["train/loss_unc"], rel=1e-5
        )
        assert x["train/skipped_steps"] == 0 and x["train/steps_per_sec"] > 0
    # The selection score of the last step is the mean source-validation Dice of the summary.
    selection = [
        x["eval/source_val_mean_dice"]
        for x in lines
        if x["step"] == 4 and "eval/source_val_mean_dice" in x
    ]
    source = [summary["evals"][n][s]["dice"] for n in ("Domain1", "Domain2") for s in ("OD", "OC")]
    assert selection == [pytest.approx(np.mean(source), abs=1e-12)]


def test_train_metrics_are_the_means_over_the_log_window_without_skipped_steps():
    import math

    import numpy as np

    from puseg_jax.train import train_metrics

    def step(loss, grad_norm, finite=True):
        return {
            "loss": np.float32(loss),
            "grad_norm": np.float32(grad_norm),
            "finite_loss": np.bool_(finite),
            "finite_grads": np.bool_(True),
        }

    # Two fetches in one window (a checkpoint fetched the first two steps), one step skipped.
    window = train_metrics.aggregate_train_metrics(None, [(1, step(1.0, 4.0)), (2, step(2.0, 8.0))])
    window = train_metrics.aggregate_train_metrics(window, [])
    window = train_metrics.aggregate_train_metrics(
        window, [(3, step(float("nan"), float("inf"), finite=False)), (4, step(4.5, 2.0))]
    )
    means = {k: float(v) for k, v in window.compute().items()}
    assert means == pytest.approx({"loss": 2.5, "grad_norm": 14.0 / 3}, rel=1e-6)
    assert train_metrics.window_means(window) == means  # the compiled reading the loop uses
    # A window of one step is that step's value, exactly (what the log showed before).
    one = train_metrics.aggregate_train_metrics(None, [(7, step(0.123456789, 1.0))])
    assert train_metrics.window_means(one)["loss"] == float(np.float32(0.123456789))
    # Only skipped steps: no mean (NaN), never a value of a skipped step.
    skipped = train_metrics.aggregate_train_metrics(None, [(8, step(5.0, 1.0, finite=False))])
    assert math.isnan(train_metrics.window_means(skipped)["loss"])


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
