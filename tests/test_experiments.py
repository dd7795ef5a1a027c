"""The suite runner (dry run) and the results aggregation, on fabricated run directories."""

import csv
import importlib
import json
import sys

import numpy as np
import pytest
from scipy import stats as sps

from puseg_jax import experiments
from puseg_jax.model import losses
from puseg_jax.runs import stats, tables
from puseg_jax.runs import suite as runs_suite


def _fake_run(
    root,
    target,
    method,
    seed,
    dice,
    per_case,
    wall_s=60.0,
    auroc=0.9,
    ratio=3.0,
    variant=None,
    suite="cpu",
    val=(0.9, 0.7),
    val_hd95=(3.0, 5.0),
):
    """A finished run: summary.json, eval/<target>/per_case.csv and wall_time.json."""
    workdir = runs_suite.run_dir(root, "fundus", suite, target, variant or method, seed)
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
                "num_cases": 3,
                "OD": {"dice": val[0], "hd95": val_hd95[0]},
                "OC": {"dice": val[1], "hd95": val_hd95[1]},
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
    runs = tables.collect(fake_suite, "fundus")
    assert len(runs) == 5
    rows = {(r["target"], r["variant"]): r for r in tables.aggregate(runs)}
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
    ordered = [(r["target"], r["variant"]) for r in tables.aggregate(runs)]
    assert ordered == [("Domain1", "erm"), ("Domain1", "ours"), ("Domain3", "ours")]
    # Restricting by seed or method.
    assert len(tables.collect(fake_suite, "fundus", seeds=[1])) == 2
    assert len(tables.collect(fake_suite, "fundus", variants=["erm"])) == 2
    # Another suite (budget or layout) is never read.
    assert tables.collect(fake_suite, "fundus", suite="paper") == []


def test_paired_comparison_by_hand(fake_suite):
    paired = stats.paired_comparison(tables.collect(fake_suite, "fundus"))
    # Domain3 has no erm run: only Domain1 is compared.
    assert {p["target"] for p in paired} == {"Domain1"}
    od = next(p for p in paired if p["structure"] == "OD")
    # Per-case differences: seed 0 (+0.02, +0.04, -0.02), seed 1 (+0.04, +0.02, +0.01).
    assert od["num_cases"] == 3 and od["seeds"] == [0, 1]
    assert od["mean_diff"] == pytest.approx(0.055 / 3)
    assert od["seed_diffs"] == pytest.approx([0.04 / 3, 0.07 / 3])
    assert od["wins"] == 2 and (od["method"], od["baseline"]) == ("ours", "erm")
    # The split-t interval by hand: V1 = MS_seed / (S n), V2 = (MS_case - MS_err) / (S n).
    d = np.array([[0.02, 0.04, -0.02], [0.04, 0.02, 0.01]])
    ms_seed = 3 * 2 * 0.005**2  # seed means 0.0133 and 0.0233 around 0.0183
    ms_case = 2 * np.sum((d.mean(axis=0) - d.mean()) ** 2) / 2
    resid = d - d.mean(axis=1, keepdims=True) - d.mean(axis=0) + d.mean()
    ms_err = float(np.sum(resid**2)) / 2
    v1, v2 = ms_seed / 6, (ms_case - ms_err) / 6
    half = np.sqrt(sps.t.ppf(0.975, 1) ** 2 * v1 + sps.t.ppf(0.975, 2) ** 2 * v2)
    assert half == pytest.approx(0.0740005, abs=1e-6)
    assert od["ci95"] == pytest.approx((0.055 / 3 - half, 0.055 / 3 + half), rel=1e-9)
    assert od["interval"] == stats.METHOD and od["verdict"] == "no difference shown"
    assert od["dropped_cases"] == 0
    oc = next(p for p in paired if p["structure"] == "OC")
    assert oc["mean_diff"] == pytest.approx((0.05 + 0.0 + 0.05) / 3)


def test_one_seed_gives_a_case_interval_and_no_verdict(fake_suite):
    runs = tables.collect(fake_suite, "fundus", seeds=[1])
    od = next(p for p in stats.paired_comparison(runs) if p["structure"] == "OD")
    # Seed 1 alone: +0.04, +0.02, +0.01; the t interval over the three cases.
    se = np.std([0.04, 0.02, 0.01], ddof=1) / np.sqrt(3)
    lo, hi = sps.t.interval(0.95, 2, loc=0.07 / 3, scale=se)
    assert od["ci95"] == pytest.approx((lo, hi))
    assert od["verdict"] == stats.ONE_SEED
    # Even a case interval far from zero is no verdict: one seed says nothing about the next.
    clear = stats.paired_interval(np.array([[0.03, 0.04, 0.05, 0.035]]))
    assert clear["ci"][0] > 0 and not clear["covers_seed_noise"]
    assert stats.interval_verdict(clear) == stats.ONE_SEED
    text = tables.format_results("fundus", tables.aggregate(runs), [od])
    assert f"| {stats.ONE_SEED} |" in text


def test_missing_case_scores_are_left_out_of_every_seed(fake_suite):
    path = fake_suite / "fundus" / "cpu" / "Domain1" / "ours" / "seed1" / "eval" / "Domain1"
    text = (path / "per_case.csv").read_text().replace("b,OD,0.82,", "b,OD,nan,")
    (path / "per_case.csv").write_text(text)
    runs = tables.collect(fake_suite, "fundus")
    od = next(p for p in stats.paired_comparison(runs) if p["structure"] == "OD")
    # Case b is dropped from both seeds: seed 0 (+0.02, -0.02), seed 1 (+0.04, +0.01).
    assert (od["num_cases"], od["dropped_cases"]) == (2, 1)
    assert od["seed_diffs"] == pytest.approx([0.0, 0.025])
    assert od["wins"] == 1
    assert "| 2 (1 left out) | 2 |" in tables.format_results("fundus", tables.aggregate(runs), [od])


def test_unpairable_runs_raise(fake_suite):
    path = fake_suite / "fundus" / "cpu" / "Domain1" / "ours" / "seed0" / "eval" / "Domain1"
    with open(path / "per_case.csv", "a", newline="") as f:
        csv.writer(f).writerow(["d", "OD", 0.5, 1, 1, False, False])
    with pytest.raises(ValueError, match="different cases"):
        stats.paired_comparison(tables.collect(fake_suite, "fundus"))


def test_table_mode_writes_results(fake_suite, capsys):
    assert experiments.main(["table", "fundus", "--root", str(fake_suite)]) == 0
    text = (fake_suite / "fundus" / "cpu" / "results.md").read_text()
    assert text in capsys.readouterr().out
    assert "| Domain1 | erm | 2 | 0.8500 ± 0.0707 |" in text
    # One seed: no spread to show.
    assert "| Domain3 | ours | 1 | 0.7000 | 0.5000 |" in text
    assert "| Domain1 | OD | ours | erm | 3 | 2 | +0.0183 | +0.0133, +0.0233 |" in text
    assert "## Mean over targets" in text and "## Source validation" in text
    assert "Scored at resolution: network" in text
    data = json.loads((fake_suite / "fundus" / "cpu" / "results.json").read_text())
    assert len(data["rows"]) == 3 and len(data["paired"]) == 2
    assert data["choice"] is None


def test_variants_are_compared_and_the_default_is_chosen_on_source_validation(tmp_path):
    cases = {"a": (0.9, 0.7), "b": (0.8, 0.6)}
    lam3 = "ours__loss.lambda_max=3"
    for target in ("Domain1", "Domain3"):
        for seed in (0, 1):
            # Target Dice favours lambda 3. Source validation: on Domain1, no highlighting,
            # with lambda 3 tied on Dice but with the larger HD95; on Domain3, lambda 3 by
            # 0.01 Dice. Each target gets its own choice.
            _fake_run(tmp_path, target, "ours", seed, (0.8, 0.6), cases, val=(0.90, 0.70))
            _fake_run(
                tmp_path,
                target,
                "ours",
                seed,
                (0.9, 0.7),
                cases,
                variant=lam3,
                val=(0.905, 0.70) if target == "Domain1" else (0.925, 0.70),
                val_hd95=(4.0, 6.0),
            )
            _fake_run(
                tmp_path,
                target,
                "ours_no_highlight",
                seed,
                (0.7, 0.5),
                cases,
                val=(0.906, 0.70),
                val_hd95=(2.0, 4.0),
            )
            _fake_run(tmp_path, target, "erm", seed, (0.7, 0.5), cases, val=(0.80, 0.60))
    argv = ["table", "fundus", "--root", str(tmp_path), "--choose"]
    argv += ["--compare", f"{lam3}:ours_no_highlight,ours:erm"]
    assert experiments.main(argv) == 0
    data = json.loads((tmp_path / "fundus" / "cpu" / "results.json").read_text())
    choices = {c["target"]: c for c in data["choice"]}
    assert {t: c["chosen"] for t, c in choices.items()} == {
        "Domain1": "ours_no_highlight",
        "Domain3": lam3,
    }
    assert {c["variant"] for c in choices["Domain1"]["candidates"]} == {
        "ours",
        lam3,
        "ours_no_highlight",
    }
    # Only the target's own runs were read, and only their source validation (Domain4 here).
    assert {u["target"] for u in choices["Domain3"]["used"]} == {"Domain3"}
    assert choices["Domain1"]["source_val_evals"] == [["Domain4", "test", 3]]
    pairs = {(p["method"], p["baseline"]) for p in data["paired"]}
    assert pairs == {(lam3, "ours_no_highlight"), ("ours", "erm")}
    text = (tmp_path / "fundus" / "cpu" / "results.md").read_text()
    assert "**Chosen for Domain1: `ours_no_highlight`.**" in text
    assert "Source-validation evaluators read: Domain4 test (3 cases)." in text
    assert f"**Chosen for Domain3: `{lam3}`.**" in text
    # The source-validation columns are the pooled values of the run summaries.
    rows = {(r["target"], r["variant"]): r for r in data["rows"]}
    assert rows[("Domain1", lam3)]["stats"]["source_val/OD/hd95"][0] == pytest.approx(4.0)
    with pytest.raises(SystemExit):
        experiments.main(["table", "fundus", "--root", str(tmp_path), "--compare", "ours"])


def test_run_folders_name_everything_that_changes_the_computation(tmp_path):
    base = ["--config.data.data_dir=/d", "--config.data.manual_dir=/m"]
    plain = runs_suite.plan_runs("fundus", ["ours"], ["Domain1"], [0], tmp_path, overrides=base)
    lam = runs_suite.plan_runs(
        "fundus",
        ["ours"],
        ["Domain1"],
        [0],
        tmp_path,
        overrides=base + ["--config.loss.lambda_max=3", "--config.loss.highlight_terms=ce+unc"],
    )
    paper = runs_suite.plan_runs(
        "fundus", ["ours"], ["Domain1"], [0], tmp_path, budget="paper", overrides=base
    )
    nifti = runs_suite.plan_runs("prostate", ["ours"], ["HK"], [0], tmp_path, nifti=True)
    assert plain[0]["workdir"] == str(tmp_path / "fundus" / "cpu" / "Domain1" / "ours" / "seed0")
    assert lam[0]["variant"] == "ours__loss.highlight_terms=ce+unc__loss.lambda_max=3"
    assert paper[0]["workdir"] == str(tmp_path / "fundus" / "paper" / "Domain1" / "ours" / "seed0")
    assert "/prostate/cpu_nifti/HK/ours/seed0" in nifti[0]["workdir"]
    assert len({r[0]["workdir"] for r in (plain, lam, paper)}) == 3
    with pytest.raises(ValueError, match="set by the runner"):
        runs_suite.variant_name("ours", ["--config.method=erm"])
    with pytest.raises(ValueError, match="--config.FIELD=VALUE"):
        runs_suite.variant_name("ours", ["--loss.lambda_max=3"])


def test_dry_run_plans_every_run_and_skips_finished_ones(tmp_path, capsys):
    # The override changes the computation, so it names the variant: a finished run of plain
    # `erm` would not count as done.
    _fake_run(tmp_path, "Domain1", "erm", 0, (0.8, 0.6), {"a": (0.8, 0.6)})
    variant = "erm__num_train_steps=2"
    _fake_run(tmp_path, "Domain1", "erm", 0, (0.8, 0.6), {"a": (0.8, 0.6)}, variant=variant)
    argv = ["fundus", "erm", "--targets=Domain1,Domain3", "ours", "--seeds", "0,1"]
    argv += ["--root", str(tmp_path), "--dry_run", "--config.num_train_steps=2"]
    argv += ["--manual_dir", "/data/fundus"]
    assert experiments.main(argv) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if "puseg_jax.main" in line]
    assert len(commands) == 2 * 2 * 2 - 1
    assert "8 runs, 1 done, 7 to run" in out
    assert not any(f"Domain1/{variant}/seed0" in c for c in commands)
    first = commands[0]
    assert "--config=configs/fundus.py:Domain1,cpu" in first
    assert f"--workdir={tmp_path}/fundus/cpu/Domain1/{variant}/seed1" in first
    for part in ("--config.method=erm", "--config.seed=1", "--config.num_train_steps=2"):
        assert part in first
    assert "--config.data.manual_dir=/data/fundus" in first
    # Nothing ran: no workdir was created for the planned runs.
    assert not (tmp_path / "fundus" / "Domain3").exists()


@pytest.mark.parametrize(
    "family, budget, nifti", [("fundus", "cpu", False), ("prostate", "paper", True)]
)
def test_planned_configs_load_and_validate(tmp_path, family, budget, nifti):
    from puseg_jax.train import config as train_config

    runs = runs_suite.plan_runs(
        family,
        losses.METHODS,
        runs_suite.FAMILIES[family]["targets"],
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
        train_config.validate_config(config)
        assert list(config.data.target_domains) == [run["target"]]
        assert run["target"] not in config.data.source_domains
        roles = {n: e["role"] for n, e in train_config.resolve_evals(config).items()}
        assert roles.pop(run["target"]) == "target"
        assert set(roles.values()) == {"source_val"}
        assert set(roles) == set(config.data.source_domains)


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown method"):
        runs_suite.plan_runs("fundus", ["nope"], ["Domain1"], [0], "/tmp")
    with pytest.raises(ValueError, match="Unknown target"):
        runs_suite.plan_runs("fundus", ["erm"], ["RUNMC"], [0], "/tmp")
    with pytest.raises(ValueError, match="prostate family only"):
        runs_suite.plan_runs("fundus", ["erm"], ["Domain1"], [0], "/tmp", nifti=True)
    with pytest.raises(SystemExit, match="Unknown command line flag 'bogus'"):
        experiments.main(["fundus", "--bogus"])


def test_command_line_flags(fake_suite, capsys):
    def refused(argv, match):
        with pytest.raises(SystemExit, match=match) as e:
            experiments.main(argv)
        assert e.value.code != 0

    # The absl spelling only, with absl's suggestion for the old one.
    refused(["fundus", "--dry-run"], "Unknown command line flag 'dry-run'. Did you mean: dry_run")
    # A list written with spaces would make its values methods: refused, with the syntax.
    refused(["fundus", "--targets", "Domain1", "Domain3"], "--targets=A,Domain3")
    refused(["fundus", "--seeds", "0", "1", "--dry_run"], "--seeds=0,1")
    refused(["table", "fundus", "--compare", "a:b", "c:d"], "--compare=A:B,c:d")
    refused(["fundus", "--seeds=0,x"], "--seeds takes integers")
    refused(["fundus", "--config.seed", "3"], "--config.FIELD=VALUE")
    refused(["--budget=paper"], "missing FAMILY")
    refused(["retina"], "unknown family 'retina'")
    refused(["fundus", "--budget=gpu"], "value should be one of <cpu|paper>")
    with pytest.raises(SystemExit) as e:
        experiments.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("Runs a leave-one-domain-out suite")
    assert "results.md" in help_text and "--dry_run" in help_text and "--manual_dir" in help_text
    # Each call parses afresh: an earlier call's flags do not carry over.
    argv = ["table", "fundus", "--root", str(fake_suite)]
    assert experiments.main([*argv, "--choose", "--compare=ours:erm"]) == 0
    assert json.loads((fake_suite / "fundus" / "cpu" / "results.json").read_text())["choice"]
    assert experiments.main(argv) == 0
    data = json.loads((fake_suite / "fundus" / "cpu" / "results.json").read_text())
    assert data["choice"] is None


def test_highlight_diagnostics_are_tabulated_per_variant(fake_suite):
    """Runs that logged the gradient-share diagnostics get their own block: mean over the last
    quarter of each run, then mean ± std over seeds; runs without them are not listed."""
    for seed, shares in ((0, (0.30, 0.40)), (1, (0.50, 0.60))):
        workdir = runs_suite.run_dir(fake_suite, "fundus", "cpu", "Domain1", "ours", seed)
        lines = [
            {
                "step": step,
                "train/grad_share_top10u": share,
                "train/grad_share_band": 0.5,
                "train/top10u_band_overlap": 0.25,
                "train/band_fraction": 0.1,
            }
            for step, share in zip(
                (100, 3500, 4000), (0.99,) + shares, strict=True
            )  # step 100: not averaged
        ]
        (workdir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    rows = {
        (r["target"], r["variant"]): r
        for r in tables.aggregate(tables.collect(fake_suite, "fundus"))
    }
    mean, std, n = rows[("Domain1", "ours")]["stats"]["diag/grad_share_top10u"]
    assert n == 2 and mean == pytest.approx(0.45)
    assert std == pytest.approx(np.std([0.35, 0.55], ddof=1))
    assert rows[("Domain1", "erm")]["stats"]["diag/grad_share_top10u"][2] == 0
    text = tables.format_results("fundus", list(rows.values()), [])
    block = text.split("## How strong was the highlighting")[1].split("##")[0]
    assert (
        "| Domain1 | ours | 2 | 0.450 ± 0.141 | 0.500 ± 0.000 | 0.250 ± 0.000 | 0.100 ± 0.000 |"
        in block
    )
    assert "erm" not in block and "Domain3" not in block


def test_a_resumed_run_sums_its_wall_time_segments(tmp_path):
    """execute_run: each process of a run (one per session of a queue) is a segment, so the
    table's wall column is the whole run, not its last stretch: an older record counts as one
    segment, and a process killed with its session (its segment left open) is closed at the last
    write to its log.txt."""
    import os
    import time

    suite = runs_suite
    workdir = tmp_path / "run"
    workdir.mkdir()
    # A record from before segments were kept: one segment of 100 s.
    old = {"wall_s": 100.0, "returncode": -9, "started": "2026-12-07T10:00:00", "command": []}
    (workdir / "wall_time.json").write_text(json.dumps(old))
    run = {k: "x" for k in suite.RUN_KEYS} | {"workdir": str(workdir)}
    run["command"] = [sys.executable, "-c", "import time; time.sleep(0.3)"]
    first = suite.execute_run(run)
    assert [s["returncode"] for s in first["segments"]] == [-9, 0]
    assert first["started"] == "2026-12-07T10:00:00"
    assert 100.3 <= first["wall_s"] < 110
    assert json.loads((workdir / "wall_time.json").read_text()) == first

    # A process killed before it could close its segment: what execute_run left on disk while
    # it ran, with the log last written 30 s after that segment started.
    killed_start = time.time() - 50.0
    open_segment = {
        "started": "t",
        "started_unix": killed_start,
        "wall_s": None,
        "returncode": None,
    }
    running = first | {"segments": first["segments"] + [open_segment]}
    (workdir / "wall_time.json").write_text(json.dumps(running))
    os.utime(workdir / "log.txt", (killed_start + 30.0, killed_start + 30.0))
    run["command"] = [sys.executable, "-c", "raise SystemExit(3)"]
    second = suite.execute_run(run)
    assert json.loads((workdir / "wall_time.json").read_text()) == second
    assert [s["returncode"] for s in second["segments"]] == [-9, 0, None, 3]
    assert second["segments"][2]["wall_s"] == pytest.approx(30.0, abs=0.2)
    assert "killed" in second["segments"][2]["ended"]
    assert second["returncode"] == 3
    assert second["wall_s"] == pytest.approx(sum(s["wall_s"] for s in second["segments"]), abs=0.2)
    assert second["wall_s"] >= first["wall_s"] + 30.0


def test_a_running_process_leaves_its_segment_open(tmp_path):
    """While the process runs, wall_time.json holds its open segment (what a kill leaves)."""
    workdir = tmp_path / "run"
    run = {k: "x" for k in runs_suite.RUN_KEYS} | {"workdir": str(workdir)}
    probe = "import json; print(json.load(open('wall_time.json'))['segments'][-1])"
    run["command"] = [sys.executable, "-c", f"import os; os.chdir({str(workdir)!r}); {probe}"]
    record = runs_suite.execute_run(run)
    seen = (workdir / "log.txt").read_text().splitlines()[-1]
    assert "'wall_s': None" in seen and "'returncode': None" in seen
    assert record["segments"][-1]["returncode"] == 0 and len(record["segments"]) == 1


def test_per_run_rows_list_every_seed(fake_suite):
    """`--per_run`: one row per run, in target/seed order, with that run's own source-validation
    and target numbers (not the seed means)."""
    per_run_args, _ = experiments.parse_args(["table", "fundus", "--per_run"])
    assert per_run_args["per_run"] is True
    text = tables.write_results(fake_suite, "fundus", compare=[], per_run=True)
    block = text.split("## Per run")[1]
    rows = [line for line in block.splitlines() if line.startswith("| Domain")]
    assert [r.split(" | ")[:3] for r in rows] == [
        ["| Domain1", "erm", "0"],
        ["| Domain1", "ours", "0"],
        ["| Domain1", "erm", "1"],
        ["| Domain1", "ours", "1"],
        ["| Domain3", "ours", "0"],
    ]
    # erm seed 1: target OD 0.9, OC 0.6, HD95 3.0 (2 + seed) and 4.0; source val 0.9 / 0.7.
    assert rows[2] == "| Domain1 | erm | 1 | 0.9000 | 0.7000 | 0.9000 | 0.6000 | 3.00 | 4.00 |"
    assert rows[3].split(" | ")[6] == "0.7500"  # ours seed 1 OC: 0.65 + 0.1
    assert "## Per run" not in tables.write_results(fake_suite, "fundus", compare=[])
    # A run that logged the highlighting diagnostics adds its last-quarter means; the others
    # show n/a there.
    workdir = runs_suite.run_dir(fake_suite, "fundus", "cpu", "Domain1", "ours", 1)
    record = {
        "step": 4000,
        "train/grad_share_top10u": 0.8,
        "train/grad_share_band": 0.9,
        "train/top10u_band_overlap": 0.7,
        "train/band_fraction": 0.15,
    }
    (workdir / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    text = tables.write_results(fake_suite, "fundus", compare=[], per_run=True)
    rows = [r for r in text.split("## Per run")[1].splitlines() if r.startswith("| Domain")]
    assert rows[3].endswith("| 0.7500 | 3.00 | 4.00 | 0.800 | 0.900 | 0.700 |")
    assert rows[2].endswith("| 3.00 | 4.00 | n/a | n/a | n/a |")
