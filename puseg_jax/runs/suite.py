"""A leave-one-domain-out suite: the runs it plans, their workdirs, and running them as
separate `python -m puseg_jax.main` processes."""

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from puseg_jax.core import config_diff
from puseg_jax.core.paths import REPO_ROOT
from puseg_jax.model import losses
from puseg_jax.runs.run_folder import RunFolder

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

FAMILIES: dict[str, dict[str, Any]] = {
    "fundus": {
        "targets": ("Domain1", "Domain2", "Domain3", "Domain4"),
        "manual_dir": SHARED_DATA / "fundus",
    },
    "prostate": {
        "targets": ("RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK"),
        "manual_dir": SHARED_DATA / "prostate_slices",
    },
}

# ---------------------------------------------------------------------------------------------
# Planning and running.


def config_arg(family: str, target: str, budget: str, nifti: bool = False) -> str:
    """The `configs/<family>.py:<arg>` argument of one run."""
    parts = [target] + (["cpu"] if budget == "cpu" else []) + (["nifti"] if nifti else [])
    return f"configs/{family}.py:{','.join(parts)}"


def suite_name(budget: str, nifti: bool = False) -> str:
    """The folder of one budget and data layout: 'cpu', 'paper', 'cpu_nifti', 'paper_nifti'."""
    return budget + ("_nifti" if nifti else "")


def _override_pairs(overrides: Sequence[str]) -> list[tuple[str, str]]:
    """['--config.a.b=1'] -> [('a.b', '1')]; anything else is an error."""
    pairs = []
    for o in overrides:
        if not o.startswith("--config.") or "=" not in o:
            raise ValueError(f"Override {o!r} is not of the form --config.FIELD=VALUE")
        key, value = o[len("--config.") :].split("=", 1)
        pairs.append((key, value))
    return pairs


def variant_name(method: str, overrides: Sequence[str] = ()) -> str:
    """The method, then each override that changes the computation, sorted, as key=value.

    'ours' with ['--config.loss.lambda_max=3', '--config.data.data_dir=/x'] ->
    'ours__loss.lambda_max=3' (the data dir is incidental). A `--config.method=` override is
    refused: the method is given apart.
    """
    parts = []
    for key, value in sorted(_override_pairs(overrides)):
        if key in ("method", "seed"):
            raise ValueError(f"--config.{key} is set by the runner; pass it as an argument")
        if not config_diff.is_incidental(key):
            parts.append(f"{key}={value}".replace("/", "_").replace(" ", ""))
    return "__".join([method] + parts)


def run_dir(
    root: str | Path, family: str, suite: str, target: str, variant: str, seed: int
) -> Path:
    """`<root>/<family>/<suite>/<target>/<variant>/seed<k>`."""
    return Path(root) / family / suite / target / variant / f"seed{seed}"


def plan_runs(
    family: str,
    methods: Sequence[str],
    targets: Sequence[str],
    seeds: Sequence[int],
    root: str | Path,
    budget: str = "cpu",
    nifti: bool = False,
    manual_dir: str = "",
    data_dir: str = "",
    overrides: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Every run of the suite, in order: target, then method, then seed.

    Args:
      family: 'fundus' or 'prostate'.
      methods: method names (losses.METHODS).
      targets: held-out domains.
      seeds: seeds (config.seed).
      root: the suite's root directory.
      budget: 'cpu' (the fixed CPU budget) or 'paper' (paper scale).
      nifti: prostate only: the SAML NIfTI release instead of the PNG slices.
      manual_dir: the downloaded release ('' leaves the config's).
      data_dir: the TFDS data dir ('' leaves the config's).
      overrides: extra `--config.FIELD=VALUE` arguments for every run; those that change the
        computation name the variant (`variant_name`).

    Returns:
      Dicts with 'family', 'suite', 'target', 'method', 'variant', 'overrides', 'seed',
      'workdir', 'command' (argv) and 'done' (its summary.json exists).
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    if nifti and family != "prostate":
        raise ValueError("--nifti applies to the prostate family only")
    bad = [m for m in methods if m not in losses.METHODS]
    if bad:
        raise ValueError(f"Unknown method(s) {bad}; expected some of {losses.METHODS}")
    known = FAMILIES[family]["targets"]
    bad = [t for t in targets if t not in known]
    if bad:
        raise ValueError(f"Unknown target(s) {bad} for {family}; expected some of {known}")
    if budget not in ("cpu", "paper"):
        raise ValueError(f"Unknown budget {budget!r}; expected 'cpu' or 'paper'")
    suite = suite_name(budget, nifti)
    runs = []
    for target in targets:
        for method in methods:
            variant = variant_name(method, overrides)
            for seed in seeds:
                workdir = run_dir(root, family, suite, target, variant, seed)
                command = [
                    sys.executable,
                    "-m",
                    "puseg_jax.main",
                    f"--config={config_arg(family, target, budget, nifti)}",
                    f"--workdir={workdir}",
                    f"--config.method={method}",
                    f"--config.seed={seed}",
                ]
                if manual_dir:
                    command.append(f"--config.data.manual_dir={manual_dir}")
                if data_dir:
                    command.append(f"--config.data.data_dir={data_dir}")
                command.extend(overrides)
                runs.append(
                    dict(
                        family=family,
                        suite=suite,
                        target=target,
                        method=method,
                        variant=variant,
                        overrides=list(overrides),
                        seed=seed,
                        workdir=str(workdir),
                        command=command,
                        done=RunFolder(workdir).has_summary(),
                    )
                )
    return runs


RUN_KEYS = ("family", "suite", "target", "method", "variant", "overrides", "seed")


def _previous_segments(workdir: Path) -> list[dict[str, Any]]:
    """The segments earlier processes of this run recorded in `wall_time.json` (none if it
    never ran; a record from before segments were kept counts as one). A segment still open was
    killed with its session before it could record its end: it is closed at the last write to
    the run's log.txt, a lower bound of when it stopped."""
    path = workdir / "wall_time.json"
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    if "segments" not in record:
        return [{k: record[k] for k in ("started", "wall_s", "returncode") if k in record}]
    segments = []
    for segment in record["segments"]:
        if segment.get("wall_s") is None:
            log = workdir / "log.txt"
            last_write = log.stat().st_mtime if log.is_file() else segment["started_unix"]
            segment = segment | {
                "wall_s": round(max(last_write - segment["started_unix"], 0.0), 1),
                "ended": "killed: closed at log.txt's last write",
            }
        segments.append(segment)
    return segments


def _write_wall_time(workdir: Path, command: list[str], segments: list[dict[str, Any]]) -> dict:
    record = {
        "wall_s": round(sum(s["wall_s"] or 0.0 for s in segments), 1),
        "returncode": segments[-1]["returncode"],
        "started": segments[0]["started"],
        "command": command,
        "segments": segments,
    }
    with open(workdir / "wall_time.json", "w") as f:
        json.dump(record, f, indent=2)
    return record


def execute_run(run: dict[str, Any]) -> dict[str, Any]:
    """Runs one training-and-evaluation process, its output going to `<workdir>/log.txt`.

    Writes `<workdir>/run.json` (what the run is: `RUN_KEYS` and the command) first.

    Each process of a run is a segment of `wall_time.json` (a queue stopped with its session
    resumes the run in a new one): the segment is recorded open when the process starts and
    closed when it ends, and `wall_s` is the sum over segments, the run's whole wall time.

    Returns:
      The record also written to `<workdir>/wall_time.json`: wall seconds, return code (of the
      last segment), first start, command, segments.
    """
    workdir = Path(run["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    identity = {k: run[k] for k in RUN_KEYS} | {"command": run["command"]}
    (workdir / "run.json").write_text(json.dumps(identity, indent=2))
    previous = _previous_segments(workdir)
    started = time.time()
    segment = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "started_unix": round(started, 1),
        "wall_s": None,
        "returncode": None,
    }
    _write_wall_time(workdir, run["command"], previous + [segment])
    with open(workdir / "log.txt", "a") as log:
        log.write(f"\n$ {' '.join(run['command'])}\n")
        log.flush()
        rc = subprocess.call(run["command"], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    segment |= {"wall_s": round(time.time() - started, 1), "returncode": rc}
    return _write_wall_time(workdir, run["command"], previous + [segment])


def run_suite(runs: list[dict[str, Any]], dry_run: bool = False) -> list[dict[str, Any]]:
    """Runs every run not done yet, one after the other; returns the failed ones."""
    todo = [r for r in runs if not r["done"]]
    print(f"[experiments] {len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to run")
    failed = []
    for i, run in enumerate(todo, start=1):
        tag = f"{run['target']}/{run['variant']}/seed{run['seed']}"
        if dry_run:
            print(" ".join(run["command"]))
            continue
        print(f"[experiments] ({i}/{len(todo)}) {tag} -> {run['workdir']}", flush=True)
        record = execute_run(run)
        status = "ok" if record["returncode"] == 0 else f"FAILED (rc {record['returncode']})"
        print(f"[experiments] {tag}: {status} in {record['wall_s']:.0f} s", flush=True)
        if record["returncode"] != 0:
            failed.append(run)
    if dry_run:
        for run in runs:
            if run["done"]:
                print(f"# done: {run['workdir']}")
    return failed
