"""runs.curves: the source-validation learning curve of a run, from its metrics.jsonl."""

import json

import numpy as np
import pytest

from puseg_jax.runs import choice, curves


def _write_run(path, steps, with_target=True):
    evals = {
        "A": {"role": "source_val", "num_cases": 3, "OD": {"dice": 0.0}, "OC": {"dice": 0.0}},
        "B": {"role": "source_val", "num_cases": 1, "OD": {"dice": 0.0}, "OC": {"dice": 0.0}},
    }
    if with_target:
        evals["T"] = {"role": "target", "num_cases": 5, "OD": {"dice": 0.0}, "OC": {"dice": 0.0}}
    (path / "summary.json").write_text(json.dumps({"structures": ["OD", "OC"], "evals": evals}))
    lines = []
    for i, step in enumerate(steps):
        lines.append({"step": step, "train/loss": 1.0 / (i + 1)})
        for name, base in (("A", 0.5), ("B", 0.7), ("T", 0.0)):
            record = {"step": step}
            for s, shift in (("OD", 0.2), ("OC", 0.0)):
                record[f"eval/{name}/{s}/dice"] = base + shift + 0.01 * i
                record[f"eval/{name}/{s}/hd95"] = 10.0 - i
            lines.append(record)
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")


def test_curve_pools_sources_by_cases_at_each_step(tmp_path):
    _write_run(tmp_path, [500, 1000, 1500])
    curve = curves.source_val_curve(tmp_path)
    assert [step for step, _ in curve] == [500, 1000, 1500]
    for i, (_, scores) in enumerate(curve):
        od = (3 * (0.7 + 0.01 * i) + 1 * (0.9 + 0.01 * i)) / 4
        oc = (3 * (0.5 + 0.01 * i) + 1 * (0.7 + 0.01 * i)) / 4
        np.testing.assert_allclose(scores["OD/dice"], od, atol=1e-12)
        np.testing.assert_allclose(scores["OC/dice"], oc, atol=1e-12)
        np.testing.assert_allclose(scores["dice"], (od + oc) / 2, atol=1e-12)
        np.testing.assert_allclose(scores["OD/hd95"], 10.0 - i, atol=1e-12)


def test_curve_never_reads_the_target(tmp_path):
    _write_run(tmp_path, [500, 1000])
    before = curves.source_val_curve(tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for record in lines:
        for key in list(record):
            if key.startswith("eval/T/"):
                record[key] = -100.0
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert curves.source_val_curve(tmp_path) == before


def test_last_point_is_what_the_choice_reads(tmp_path):
    _write_run(tmp_path, [500, 1000])
    summary = json.loads((tmp_path / "summary.json").read_text())
    for name, base in (("A", 0.5), ("B", 0.7)):
        summary["evals"][name]["OD"] = {"dice": base + 0.2 + 0.01, "hd95": 9.0}
        summary["evals"][name]["OC"] = {"dice": base + 0.01, "hd95": 9.0}
    assert curves.source_val_curve(tmp_path)[-1][1] == pytest.approx(
        choice.source_val_scores(summary)
    )


def test_a_step_missing_a_source_is_left_out(tmp_path):
    _write_run(tmp_path, [500, 1000])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    kept = [x for x in lines if not ('"step": 500' in x and "eval/B/" in x)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    assert [step for step, _ in curves.source_val_curve(tmp_path)] == [1000]


def _write_diagnostics(path, steps, shares):
    """metrics.jsonl with the diagnostics at `steps` (grad_share_top10u = shares[i])."""
    lines = [{"step": s, "train/loss": 1.0} for s in steps]
    for s, share in zip(steps, shares, strict=True):
        lines.append(
            {
                "step": s,
                "train/grad_share_top10u": share,
                "train/grad_share_band": share / 2,
                "train/top10u_band_overlap": 0.5,
                "train/band_fraction": 0.1,
            }
        )
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")


def test_highlight_diagnostics_average_the_last_quarter(tmp_path):
    steps = list(range(0, 4001, 500))  # 0 ... 4000: the last quarter is 3000 < step <= 4000
    shares = [0.1 * i for i in range(len(steps))]
    _write_diagnostics(tmp_path, steps, shares)
    got = curves.highlight_diagnostics(tmp_path)
    assert got["measurements"] == 2  # 3500 and 4000
    np.testing.assert_allclose(got["grad_share_top10u"], (0.7 + 0.8) / 2, atol=1e-12)
    np.testing.assert_allclose(got["grad_share_band"], (0.35 + 0.4) / 2, atol=1e-12)
    whole = curves.highlight_diagnostics(tmp_path, last_fraction=1.0)
    assert whole["measurements"] == len(steps) - 1  # step 0 is not after the start
    np.testing.assert_allclose(whole["grad_share_top10u"], np.mean(shares[1:]), atol=1e-12)
    with pytest.raises(ValueError):
        curves.highlight_diagnostics(tmp_path, last_fraction=0.0)


def test_highlight_diagnostics_count_a_resumed_step_once(tmp_path):
    _write_diagnostics(tmp_path, [3500, 4000], [0.2, 0.4])
    with open(tmp_path / "metrics.jsonl", "a") as f:  # resumed: step 4000 written again
        f.write(json.dumps({"step": 4000, "train/grad_share_top10u": 0.6}) + "\n")
    got = curves.highlight_diagnostics(tmp_path)
    assert got["measurements"] == 2
    np.testing.assert_allclose(got["grad_share_top10u"], (0.2 + 0.6) / 2, atol=1e-12)


def test_diagnostics_curve_in_step_order_resumed_steps_once(tmp_path):
    _write_diagnostics(tmp_path, [100, 50, 150], [0.3, 0.2, 0.4])  # written out of order
    with open(tmp_path / "metrics.jsonl", "a") as f:  # resumed at 100: 100 and 150 again
        f.write(json.dumps({"step": 100, "train/grad_share_top10u": 0.35}) + "\n")
        f.write(json.dumps({"step": 150, "train/grad_share_top10u": 0.45}) + "\n")
    curve = curves.diagnostics_curve(tmp_path)
    assert [step for step, _ in curve] == [50, 100, 150]
    assert [v["grad_share_top10u"] for _, v in curve] == [0.2, 0.35, 0.45]
    assert curve[0][1]["band_fraction"] == 0.1 and "band_fraction" not in curve[1][1]
    _write_run(tmp_path, [500, 1000])  # a run without diagnostics
    assert curves.diagnostics_curve(tmp_path) == []


def test_highlight_diagnostics_absent(tmp_path):
    assert curves.highlight_diagnostics(tmp_path) is None  # no metrics.jsonl
    _write_run(tmp_path, [500, 1000])
    assert curves.highlight_diagnostics(tmp_path) is None  # metrics without diagnostics


def test_diagnostic_keys_are_the_trainers():
    from puseg_jax.train import diagnostics

    assert curves.DIAGNOSTIC_KEYS == diagnostics.KEYS


def test_plot_diagnostics_averages_the_seeds_of_an_arm(tmp_path, capsys):
    """benchmarks/plot_curves --diagnostics with LABEL=RUN,RUN: the mean of the seeds at the
    steps both measured (a step only one seed reached is left out), and a figure."""
    from benchmarks import plot_curves

    a, b = tmp_path / "seed0", tmp_path / "seed1"
    a.mkdir(), b.mkdir()
    _write_diagnostics(a, [50, 100, 150], [0.2, 0.4, 0.6])
    _write_diagnostics(b, [50, 100], [0.4, 0.8])
    steps, values = plot_curves.seed_curves([str(a), str(b)])
    assert steps == [50, 100]
    np.testing.assert_allclose(values["grad_share_top10u"], [[0.2, 0.4], [0.4, 0.8]])
    out = tmp_path / "fig.png"
    plot_curves.main(["--diagnostics", "--every", "1", "--out", str(out), f"arm={a},{b}"])
    printed = capsys.readouterr().out
    assert "| arm | 2 | 100 | 0.600 | 0.300 | 0.500 | 0.100 |" in printed
    assert out.stat().st_size > 0
