"""The per-target choice of the default variant (`runs.choice`): from the target's own runs,
on their source validation only, so no image of the target's split takes part."""

import builtins
import json
from pathlib import Path

import pytest

from puseg_jax.runs import choice, tables

DOMAINS = ("Domain1", "Domain2", "Domain3", "Domain4")


def _row(target, variant, sv_dice, sv_hd, target_dice, method="ours"):
    return dict(
        target=target,
        method=method,
        variant=variant,
        seeds=[0, 1],
        structures=["OD", "OC"],
        stats={
            "source_val_dice": (sv_dice, 0.001, 2),
            "source_val/OD/hd95": (sv_hd, 0.1, 2),
            "source_val/OC/hd95": (sv_hd, 0.1, 2),
            "OD/dice": (target_dice, 0.01, 2),
            "OC/dice": (target_dice, 0.01, 2),
        },
    )


def test_choice_reads_only_its_targets_source_validation():
    rows = [
        _row("Domain1", "ours", 0.910, 20.0, 0.90),
        _row("Domain1", "ours__loss.lambda_max=10", 0.905, 19.0, 0.99),
        _row("Domain1", "ours_no_highlight", 0.9115, 21.0, 0.80, method="ours_no_highlight"),
        _row("Domain1", "erm", 0.95, 10.0, 0.99, method="erm"),  # not a candidate
        # Another target's runs, whose source validation holds Domain1's test images:
        _row("Domain3", "ours__loss.lambda_max=10", 0.99, 1.0, 0.99),
    ]
    out = choice.choose_per_target(rows, "Domain1")
    # ours (0.910) and ours_no_highlight (0.9115) are tied within 0.002; the lower HD95 wins.
    assert out["chosen"] == "ours"
    assert [c["tied"] for c in out["candidates"]] == [True, True, False]
    assert {u["target"] for u in out["used"]} == {"Domain1"}
    assert all(k.startswith("source_val") for u in out["used"] for k in u["stats"])
    # Changing any target column, or any other target's row, changes nothing.
    shaken = [
        dict(r, stats=dict(r["stats"], **{"OD/dice": (0.0, 0, 2), "OC/dice": (1.0, 0, 2)}))
        for r in rows
    ]
    shaken[-1] = _row("Domain3", "ours", 1.0, 0.0, 1.0)
    again = choice.choose_per_target(shaken, "Domain1")
    assert again["chosen"] == out["chosen"] and again["candidates"] == out["candidates"]
    assert choice.choose_per_target(rows, "Domain2")["chosen"] is None
    # The boundary oracle reads its training batch's ground truth: reported, never chosen,
    # however good its source validation.
    oracle = _row("Domain1", "ours__loss.uncertainty_source=boundary_oracle", 0.99, 1.0, 0.99)
    with_oracle = choice.choose_per_target(rows + [oracle], "Domain1")
    assert with_oracle["chosen"] == "ours"
    assert oracle["variant"] not in [c["variant"] for c in with_oracle["candidates"]]


def _fake_run(root, target, variant, seed, sv, target_score, sources=None):
    """A finished run in the suite layout: summary.json and every evaluator's per_case.csv.
    Its source validation is the test split of the other domains (or of `sources`)."""
    wd = Path(root) / "fundus" / "cpu" / target / variant / f"seed{seed}"
    evals = {}
    for dom in DOMAINS:
        if dom != target and sources is not None and dom not in sources:
            continue
        role = "target" if dom == target else "source_val"
        score = target_score if role == "target" else sv[dom] if isinstance(sv, dict) else sv
        evals[dom] = dict(
            role=role,
            domain=dom,
            split="test",
            num_cases=2,
            OD=dict(dice=score, hd95=10.0, asd=1.0),
            OC=dict(dice=score - 0.1, hd95=20.0, asd=2.0),
        )
        (wd / "eval" / dom).mkdir(parents=True)
        rows = "".join(f"c{i},{s},{score},1,1,False,False\n" for i in (0, 1) for s in ("OD", "OC"))
        (wd / "eval" / dom / "per_case.csv").write_text(
            "case_id,structure,dice,hd95,asd,empty_pred,empty_gt\n" + rows
        )
    summary = dict(method=variant.split("__")[0], seed=seed, structures=["OD", "OC"], evals=evals)
    (wd / "summary.json").write_text(json.dumps(summary))
    return wd


def test_choice_opens_no_file_and_refuses_validation_on_the_target(tmp_path, monkeypatch):
    _fake_run(tmp_path, "Domain1", "ours", 0, 0.90, 0.5)
    _fake_run(tmp_path, "Domain1", "ours__loss.lambda_max=10", 0, 0.95, 0.1)
    _fake_run(tmp_path, "Domain3", "ours", 0, 0.99, 0.9)
    runs = tables.collect(tmp_path, "fundus")
    opened = []
    real_open = builtins.open

    def spy(path, *a, **k):
        opened.append(str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: spy(self, *a, **k))
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: spy(self, *a, **k).read())
    rows = choice.source_val_rows(runs, "Domain1")
    out = choice.choose_per_target(rows, "Domain1")
    assert opened == []  # no per_case.csv, no summary: only what `collect` loaded
    assert out["chosen"] == "ours__loss.lambda_max=10"
    assert all(d != "Domain1" for r in rows for d, _, _ in r["source_val_evals"])
    assert all("OD/dice" not in r["stats"] for r in rows)  # target columns are not even built
    # A run that validates on its own target is refused.
    bad = next(r for r in runs if r["variant"] == "ours")
    bad["summary"]["evals"]["Domain1"]["role"] = "source_val"
    with pytest.raises(ValueError, match="on the target domain Domain1"):
        choice.source_val_rows(runs, "Domain1")
    # Also when the evaluator's name is not the domain's.
    bad["summary"]["evals"]["Domain1"]["role"] = "target"
    bad["summary"]["evals"]["val_x"] = dict(bad["summary"]["evals"]["Domain2"], domain="Domain1")
    with pytest.raises(ValueError, match="'val_x' is on the target"):
        choice.source_val_rows(runs, "Domain1")


def test_no_image_of_the_target_reaches_its_choice(tmp_path):
    """Every number computed on Domain1's images (its target evaluators and the Domain3 runs'
    source validation on Domain1) is rewritten; Domain1's choice does not move. The same for
    Domain3. A table with --choose then refuses a run validating on its target."""
    sv1 = {"ours": 0.90, "ours__loss.lambda_max=10": 0.95, "ours_no_highlight": 0.93}
    sv3 = {"ours": 0.96, "ours__loss.lambda_max=10": 0.90, "ours_no_highlight": 0.91}
    for variant in sv1:
        for seed in (0, 1):
            _fake_run(tmp_path, "Domain1", variant, seed, sv1[variant], 0.8)
            # Domain3's runs validate on Domain1's test images among others.
            sv = {"Domain1": 0.7, "Domain2": sv3[variant], "Domain4": sv3[variant]}
            _fake_run(tmp_path, "Domain3", variant, seed, sv, 0.8)

    def choose():
        tables.write_results(tmp_path, "fundus", compare=[], choose=True)
        data = json.loads((tmp_path / "fundus" / "cpu" / "results.json").read_text())
        return {c["target"]: c for c in data["choice"]}

    before = choose()
    assert before["Domain1"]["chosen"] == "ours__loss.lambda_max=10"
    assert before["Domain3"]["chosen"] == "ours"
    assert [e[0] for e in before["Domain1"]["source_val_evals"]] == [
        "Domain2",
        "Domain3",
        "Domain4",
    ]
    assert "Domain3" not in [e[0] for e in before["Domain3"]["source_val_evals"]]

    def poison(domain, favour):
        # Every score on `domain`'s images, in every run, now favours `favour` by far.
        for path in (tmp_path / "fundus" / "cpu").glob("*/*/seed*/summary.json"):
            summary = json.loads(path.read_text())
            good = path.parent.parent.name == favour
            for e in summary["evals"].values():
                if e["domain"] == domain:
                    e["OD"]["dice"] = e["OC"]["dice"] = 1.0 if good else 0.0
                    e["OD"]["hd95"] = e["OC"]["hd95"] = 0.0 if good else 500.0
            path.write_text(json.dumps(summary))
            csv = path.parent / "eval" / domain / "per_case.csv"
            csv.write_text(csv.read_text().replace(",1,1,", ",999,999,"))

    poison("Domain1", "ours_no_highlight")
    after = choose()
    assert after["Domain1"]["chosen"] == before["Domain1"]["chosen"]
    assert after["Domain1"]["candidates"] == before["Domain1"]["candidates"]
    # Domain3's own choice did read Domain1 (its source): it moved, as it may.
    assert after["Domain3"]["chosen"] == "ours_no_highlight"
    poison("Domain3", "ours")
    assert choose()["Domain3"]["candidates"] == after["Domain3"]["candidates"]
    _fake_run(tmp_path, "Domain1", "ours", 7, 0.9, 0.8, sources=("Domain2",))
    summary_path = tmp_path / "fundus" / "cpu" / "Domain1" / "ours" / "seed7" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["evals"]["extra"] = dict(summary["evals"]["Domain2"], domain="Domain1")
    summary_path.write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="refused for the choice"):
        choose()
