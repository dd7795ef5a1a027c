"""`python -m puseg_jax.report`: the results table and the lines under it."""

import json
import math

import pytest


def _summary(method, source, target, ratio=None, structures=("OD", "OC")):
    """A summary.json of two source-validation domains and one target: per structure the Dice
    of each domain (`source` holds one dict per source domain)."""
    evals = {}
    for k, dice in enumerate(source):
        evals[f"Domain{k + 2}"] = {
            "role": "source_val",
            "distance_unit": "pixel",
            "num_cases": 3,
            **{s: {"dice": dice[s], "hd95": 2.0, "asd": 0.5, "n_empty_pred": 0} for s in dice},
        }
    evals["Domain1"] = {
        "role": "target",
        "distance_unit": "pixel",
        "num_cases": 3,
        **{s: {"dice": target[s], "hd95": 3.0, "asd": 0.9, "n_empty_pred": 0} for s in target},
    }
    if ratio is not None:
        evals["Domain1"]["uncertainty"] = {"u_boundary_ratio": ratio, "ece": 0.01}
    return {"method": method, "structures": list(structures), "evals": evals}


ERM = _summary(
    "erm",
    [{"OD": 0.98, "OC": 0.95}, {"OD": 0.96, "OC": 0.93}],
    {"OD": 0.95, "OC": 0.80},
    ratio=4.04,
)
OURS = _summary(
    "ours",
    [{"OD": 0.97, "OC": 0.94}, {"OD": 0.97, "OC": 0.94}],
    {"OD": 0.96, "OC": 0.85},
    ratio=6.5,
)


def test_explain_states_the_gap_the_difference_and_the_uncertainty():
    from puseg_jax.runs import explain

    lines = explain.explain([ERM, OURS]).splitlines()
    assert lines == [
        "Domain gap (Dice, source validation -> unseen Domain1): erm OD 0.970 -> 0.950, "
        "OC 0.940 -> 0.800; ours OD 0.970 -> 0.960, OC 0.940 -> 0.850",
        "On Domain1, Dice of ours - erm: OD +0.010, OC +0.050",
        "Mean uncertainty near ground-truth boundaries vs elsewhere on Domain1: erm 4.0x, "
        "ours 6.5x",
    ]
    # erm is the baseline wherever it is listed.
    assert explain.explain([OURS, ERM]).splitlines()[1] == lines[1]


def test_explain_leaves_out_what_the_summaries_lack():
    from puseg_jax.runs import explain

    no_unc = _summary("erm", [{"OD": 0.9, "OC": None}], {"OD": 0.8, "OC": float("nan")})
    lines = explain.explain([no_unc]).splitlines()
    # One run: no difference line; no uncertainty block: no uncertainty line.
    assert lines == [
        "Domain gap (Dice, source validation -> unseen Domain1): erm OD 0.900 -> 0.800, "
        "OC n/a -> n/a"
    ]
    target_only = {"method": "erm", "structures": ["OD"], "evals": {}}
    assert "No target domain" in explain.explain([target_only])
    assert explain.explain([]) == ""


def test_main_prints_table_and_explanation(tmp_path, capsys):
    from puseg_jax import report

    paths = []
    for sm in (ERM, OURS):
        (tmp_path / sm["method"]).mkdir()
        path = tmp_path / sm["method"] / "summary.json"
        path.write_text(json.dumps(sm))
        paths.append(str(path))
    text = report.main(paths)
    out = capsys.readouterr().out
    assert out.strip() == text.strip()
    # A run folder is read as its summary.json (both through runs.run_folder.RunFolder).
    assert report.main([str(tmp_path / "erm"), paths[1]]) == text
    table, explanation = text.split("\n\n")
    assert len(table.splitlines()) == 2 + 2 * 3
    assert explanation.startswith("Domain gap")
    with pytest.raises(SystemExit, match="has that run finished"):
        report.main([str(tmp_path / "missing" / "summary.json")])
    with pytest.raises(SystemExit, match="no runs: RUN/summary.json"):
        report.main([])
    with pytest.raises(SystemExit, match="Unknown command line flag 'table'"):
        report.main([*paths, "--table"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        report.main(["--help"])
    assert e.value.code == 0
    assert "summary.json" in capsys.readouterr().out


def test_explain_of_the_trained_workdir(tiny_workdir):
    from puseg_jax.runs import explain

    with open(f"{tiny_workdir}/summary.json") as f:
        summary = json.load(f)
    evals = summary["evals"]
    source = {
        s: (evals["Domain1"][s]["dice"] + evals["Domain2"][s]["dice"]) / 2 for s in "OD OC".split()
    }
    target = {s: evals["Domain3"][s]["dice"] for s in ("OD", "OC")}
    ratio = evals["Domain3"]["uncertainty"]["u_boundary_ratio"]
    assert ratio is not None and math.isfinite(ratio)  # the tiny run has a boundary and a rest
    gap = ", ".join(f"{s} {source[s]:.3f} -> {target[s]:.3f}" for s in ("OD", "OC"))
    assert explain.explain([summary]).splitlines() == [
        f"Domain gap (Dice, source validation -> unseen Domain3): ours {gap}",
        f"Mean uncertainty near ground-truth boundaries vs elsewhere on Domain3: ours {ratio:.1f}x",
    ]
    # Without the ratio, its line is left out (and nothing else changes).
    evals["Domain3"]["uncertainty"]["u_boundary_ratio"] = None
    assert explain.explain([summary]).splitlines() == [
        f"Domain gap (Dice, source validation -> unseen Domain3): ours {gap}"
    ]
