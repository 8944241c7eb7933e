"""The MLproject entry points through the real `mlflow run` command (which sets MLFLOW_RUN_ID)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_sweep import ONE_THREAD, phase_runs

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def mlflow_run(entry: str, params: dict, uri: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONUNBUFFERED="1", **ONE_THREAD)
    cmd = [str(BIN / "mlflow"), "run", str(ROOT), "-e", entry, "--env-manager", "local"]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def launcher_runs(uri):
    """The runs `mlflow run` itself created (in the Default experiment)."""
    c = MlflowClient(uri)
    return [r for r in c.search_runs(["0"]) if r.data.tags.get("mlflow.project.entryPoint")]


def test_conda_yaml_pins_the_same_dependencies_as_pyproject():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "python=3.11" in env["dependencies"] and sorted(pip) == sorted(deps)
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert project["conda_env"] == "conda.yaml"
    assert {"main", "sweep", "search", "compare"} <= set(project["entry_points"])


def test_mlflow_run_sweep_builds_one_resumable_grid_under_its_own_parent(tmp_path, tiny_random_phase, stores):
    uri, storage = stores
    params = {"phase_file": tiny_random_phase, "steps": 5, "storage": storage, "device": "cpu"}
    r = mlflow_run("sweep", params, uri, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    parents, children = phase_runs(uri)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0].info.run_id
    assert parents[0].info.status == "FINISHED"
    assert all(c.info.status == "FINISHED" and c.data.params["steps"] == "5" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent}
    (launcher,) = launcher_runs(uri)
    # MLFLOW_RUN_ID names the launcher's run; it is deliberately not the sweep's parent (each `mlflow run`
    # makes a new one, a sweep must re-attach to the same parent), only linked to it.
    assert launcher.info.run_id != parent and launcher.info.status == "FINISHED"
    assert launcher.data.tags["scaling.launcher_of"] == parent

    again = mlflow_run("sweep", params, uri, tmp_path)  # rerun: resumes, i.e. nothing left to do
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.search(r"0 trained in this invocation", again.stdout + again.stderr)
    parents2, children2 = phase_runs(uri)
    assert [p.info.run_id for p in parents2] == [parent]
    assert {c.info.run_id for c in children2} == {c.info.run_id for c in children}
    assert {r.data.tags["scaling.launcher_of"] for r in launcher_runs(uri)} == {parent}


def test_mlflow_run_search_on_quick_settings(tmp_path, tiny_random_phase, stores):
    uri, _ = stores
    params = {"phase_file": tiny_random_phase, "batch_sizes": 8, "trials": 2, "steps": 10, "device": "cpu",
              "storage": f"sqlite:///{tmp_path / 'optuna.db'}", "study_name": "quick"}
    r = mlflow_run("search", params, uri, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "study quick-B8" in r.stdout
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("scaling-phase-tiny_random")
    runs = c.search_runs([exp.experiment_id])
    (parent,) = [x for x in runs if x.data.tags.get("scaling.role") == "search"]
    trials = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 2 and {x.data.tags["optuna.study"] for x in trials} == {"quick-B8"}
    assert all(x.data.tags["source"] == "search" and x.data.params["steps"] == "10" for x in trials)
    (launcher,) = launcher_runs(uri)
    assert launcher.data.tags["scaling.launcher_of"] == parent.info.run_id


def test_entry_point_bad_input_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "entrypoints" / "sweep.py"), "--phase", "nope", "--workers", "1"],
                       capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, **ONE_THREAD), timeout=120)
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if not x.startswith("scaling ")]
    assert len(lines) == 1 and lines[0].startswith("error: unknown phase 'nope'")


@pytest.mark.parametrize("script, args, expected", [
    ("train.py", ["--batch-size", "8", "--lr", "1e-3", "--clip", "none"], "--clip none"),
    ("sweep.py", ["--clips", "none,1"], "--clips none,1"),
    ("sweep.py", ["--clips", "none"], "--clips none"),
])
def test_entry_points_pass_clip_none_on_as_no_clipping(tmp_path, script, args, expected):
    """MLproject documents clip "none" as "no clipping": it must reach the CLI, not count as "not given"."""
    r = subprocess.run([sys.executable, str(ROOT / "entrypoints" / script), "--phase", "nope", *args],
                       capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, **ONE_THREAD), timeout=120)
    (command,) = [x for x in r.stderr.splitlines() if x.startswith("scaling ")]
    assert expected in command and r.returncode == 2  # the unknown phase stops it before anything runs


def test_entry_point_usage_errors_are_one_line_too(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "entrypoints" / "sweep.py"), "--bogus", "1"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and r.stderr == "error: unrecognized arguments: --bogus 1 (see 'sweep.py --help')\n"
