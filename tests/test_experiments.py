"""The suite runner (dry run) and the results aggregation, on fabricated run directories."""

import csv
import importlib
import json

import numpy as np
import pytest

from puseg_jax import experiments, losses


def _fake_run(root, target, method, seed, dice, per_case, wall_s=60.0, auroc=0.9, ratio=3.0):
    """A finished run: summary.json, eval/<target>/per_case.csv and wall_time.json."""
    workdir = experiments.run_dir(root, "fundus", target, method, seed)
    (workdir / "eval" / target).mkdir(parents=True)
    summary = {
        "method": method,
        "seed": seed,
        "structures": ["OD", "OC"],
        "evals": {
            target: {
                "role": "target",
                "split": "test",
                "distance_unit": "pixel",
                "OD": {"dice": dice[0], "hd95": 2.0 + seed, "asd": 1.0},
                "OC": {"dice": dice[1], "hd95": 4.0, "asd": 2.0 * seed},
                "uncertainty": {"auroc_error": auroc, "u_boundary_ratio": ratio},
            },
            "Domain4": {
                "role": "source_val",
                "split": "test",
                "OD": {"dice": 0.9},
                "OC": {"dice": 0.7},
            },
        },
    }
    (workdir / "summary.json").write_text(json.dumps(summary))
    (workdir / "wall_time.json").write_text(json.dumps({"wall_s": wall_s, "returncode": 0}))
    with open(workdir / "eval" / target / "per_case.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "structure", "dice", "hd95", "asd", "empty_pred", "empty_gt"])
        for case, (od, oc) in per_case.items():
            w.writerow([case, "OD", od, 1, 1, False, False])
            w.writerow([case, "OC", oc, 1, 1, False, False])
    return workdir


@pytest.fixture
def fake_suite(tmp_path):
    cases_erm = {"a": (0.90, 0.70), "b": (0.80, 0.60), "c": (0.85, 0.50)}
    # ours: OD +0.02, +0.04, -0.02 in seed 0 and +0.04, +0.02, +0.01 in seed 1.
    ours = [
        {"a": (0.92, 0.75), "b": (0.84, 0.60), "c": (0.83, 0.55)},
        {"a": (0.94, 0.75), "b": (0.82, 0.60), "c": (0.86, 0.55)},
    ]
    for seed in (0, 1):
        _fake_run(tmp_path, "Domain1", "erm", seed, (0.8 + 0.1 * seed, 0.6), cases_erm, 120.0)
        _fake_run(tmp_path, "Domain1", "ours", seed, (0.85, 0.65 + 0.1 * seed), ours[seed], 180.0)
    _fake_run(tmp_path, "Domain3", "ours", 0, (0.7, 0.5), {"x": (0.7, 0.5)}, auroc=0.8)
    return tmp_path


def test_aggregate_means_and_stds(fake_suite):
    runs = experiments.collect(fake_suite, "fundus")
    assert len(runs) == 5
    rows = {(r["target"], r["method"]): r for r in experiments.aggregate(runs)}
    erm = rows[("Domain1", "erm")]
    assert erm["seeds"] == [0, 1]
    mean, std, n = erm["stats"]["OD/dice"]
    assert (mean, n) == (pytest.approx(0.85), 2)
    assert std == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert erm["stats"]["OD/hd95"][:2] == pytest.approx((2.5, np.std([2.0, 3.0], ddof=1)))
    assert erm["stats"]["source_val_dice"][0] == pytest.approx(0.8)
    assert erm["stats"]["wall_s"][0] == 120.0
    single = rows[("Domain3", "ours")]
    assert single["stats"]["auroc_error"] == (0.8, 0.0, 1)
    # Method order follows losses.METHODS within a target.
    ordered = [(r["target"], r["method"]) for r in experiments.aggregate(runs)]
    assert ordered == [("Domain1", "erm"), ("Domain1", "ours"), ("Domain3", "ours")]
    # Restricting by seed or method.
    assert len(experiments.collect(fake_suite, "fundus", seeds=[1])) == 2
    assert len(experiments.collect(fake_suite, "fundus", methods=["erm"])) == 2


def test_paired_comparison_by_hand(fake_suite):
    paired = experiments.paired_comparison(experiments.collect(fake_suite, "fundus"))
    # Domain3 has no erm run: only Domain1 is compared.
    assert {p["target"] for p in paired} == {"Domain1"}
    od = next(p for p in paired if p["structure"] == "OD")
    # Per-case differences averaged over the two seeds: a 0.03, b 0.03, c -0.005.
    assert od["num_cases"] == 3 and od["seeds"] == [0, 1]
    assert od["mean_diff"] == pytest.approx(0.055 / 3)
    assert od["wins"] == 2
    lo, hi = od["ci95"]
    assert -0.005 - 1e-12 <= lo < 0.055 / 3 < hi <= 0.03 + 1e-12
    oc = next(p for p in paired if p["structure"] == "OC")
    assert oc["mean_diff"] == pytest.approx((0.05 + 0.0 + 0.05) / 3)


def test_bootstrap_interval():
    values = np.random.default_rng(0).normal(1.0, 1.0, 400)
    lo, hi = experiments.bootstrap_interval(values)
    se = values.std(ddof=1) / np.sqrt(values.size)
    # The percentile interval of a mean of 400 values is close to the normal one.
    assert lo == pytest.approx(values.mean() - 1.96 * se, abs=0.25 * se)
    assert hi == pytest.approx(values.mean() + 1.96 * se, abs=0.25 * se)
    assert experiments.bootstrap_interval(np.array([0.5, 0.5])) == (0.5, 0.5)


def test_unpairable_runs_raise(fake_suite):
    path = fake_suite / "fundus" / "Domain1" / "ours" / "seed0" / "eval" / "Domain1"
    with open(path / "per_case.csv", "a", newline="") as f:
        csv.writer(f).writerow(["d", "OD", 0.5, 1, 1, False, False])
    with pytest.raises(ValueError, match="different cases"):
        experiments.paired_comparison(experiments.collect(fake_suite, "fundus"))


def test_table_mode_writes_results(fake_suite, capsys):
    assert experiments.main(["table", "fundus", "--root", str(fake_suite)]) == 0
    text = (fake_suite / "fundus" / "results.md").read_text()
    assert text in capsys.readouterr().out
    assert "| Domain1 | erm | 2 | 0.8500 ± 0.0707 |" in text
    # One seed: no spread to show.
    assert "| Domain3 | ours | 1 | 0.7000 | 0.5000 |" in text
    assert "| Domain1 | OD | 3 | 2 | +0.0183 |" in text
    assert "## Mean over targets" in text
    data = json.loads((fake_suite / "fundus" / "results.json").read_text())
    assert len(data["rows"]) == 3 and len(data["paired_ours_vs_erm"]) == 2


def test_dry_run_plans_every_run_and_skips_finished_ones(tmp_path, capsys):
    _fake_run(tmp_path, "Domain1", "erm", 0, (0.8, 0.6), {"a": (0.8, 0.6)})
    argv = ["fundus", "erm", "ours", "--targets", "Domain1", "Domain3", "--seeds", "0", "1"]
    argv += ["--root", str(tmp_path), "--dry-run", "--config.num_train_steps=2"]
    argv += ["--manual-dir", "/data/fundus"]
    assert experiments.main(argv) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if "puseg_jax.main" in line]
    assert len(commands) == 2 * 2 * 2 - 1
    assert "8 runs, 1 done, 7 to run" in out
    assert not any("Domain1/erm/seed0" in c for c in commands)
    first = commands[0]
    assert "--config=configs/fundus.py:Domain1,cpu" in first
    assert f"--workdir={tmp_path}/fundus/Domain1/erm/seed1" in first
    for part in ("--config.method=erm", "--config.seed=1", "--config.num_train_steps=2"):
        assert part in first
    assert "--config.data.manual_dir=/data/fundus" in first
    # Nothing ran: no workdir was created for the planned runs.
    assert not (tmp_path / "fundus" / "Domain3").exists()


@pytest.mark.parametrize(
    "family, budget, nifti", [("fundus", "cpu", False), ("prostate", "paper", True)]
)
def test_planned_configs_load_and_validate(tmp_path, family, budget, nifti):
    from puseg_jax import train

    runs = experiments.plan_runs(
        family,
        losses.METHODS,
        experiments.FAMILIES[family]["targets"],
        [0],
        tmp_path,
        budget=budget,
        nifti=nifti,
    )
    module = importlib.import_module(f"configs.{family}")
    for run in runs:
        arg = next(a for a in run["command"] if a.startswith("--config="))
        config = module.get_config(arg.split(":", 1)[1])
        config.method = run["method"]
        train.validate_config(config)
        assert list(config.data.target_domains) == [run["target"]]
        assert run["target"] not in config.data.source_domains
        roles = {n: e["role"] for n, e in config.evals.items()}
        assert roles.pop(run["target"]) == "target"
        assert set(roles.values()) == {"source_val"}
        assert set(roles) == set(config.data.source_domains)


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown method"):
        experiments.plan_runs("fundus", ["nope"], ["Domain1"], [0], "/tmp")
    with pytest.raises(ValueError, match="Unknown target"):
        experiments.plan_runs("fundus", ["erm"], ["RUNMC"], [0], "/tmp")
    with pytest.raises(ValueError, match="prostate family only"):
        experiments.plan_runs("fundus", ["erm"], ["Domain1"], [0], "/tmp", nifti=True)
    with pytest.raises(SystemExit):
        experiments.main(["fundus", "--bogus"])
