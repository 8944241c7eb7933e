"""The multi-host path against real components: a real `mlflow server` (one per module, backed by a
PostgreSQL database, artifacts in a temp dir), PostgreSQL for the sweep claims and Optuna's storage, real
`scaling sweep` worker processes, and the faults a lab meets: a worker SIGKILLed mid-run, the tracking
server stopped and started again, stopped for longer than the retry limit, a damaged checkpoint.

Needs ``SCALING_TEST_POSTGRES`` (``.ci/run`` sets it; locally ``eval "$(scripts/ci_postgres.sh start)"``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from conftest import TINY_RANDOM_PHASE
from live_stores import MlflowServer, free_port
from mlflow.tracking import MlflowClient

from scaling import tracking
from scaling.checkpoints import recorded

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow-server")
    s = MlflowServer(backend_uri=postgres.mlflow_database("scaling_test_store"), artifacts=d / "artifacts",
                     port=free_port(), log=d / "server.log")
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def claims(postgres) -> str:
    """The sweeps' claims database (and Optuna's storage) shared by every worker."""
    return postgres.database("scaling_test_claims")


def observed(line: str) -> None:
    """What a fault test saw (``pytest -s tests/test_multihost.py``; docs/reliability.md quotes it)."""
    print(f"\nobserved: {line}")


def phase_file(tmp_path, name: str, **train) -> str:
    """The tiny random-token phase under its own name (so its own experiment), train settings overridden."""
    text = TINY_RANDOM_PHASE.replace("name: tiny_random", f"name: {name}")
    if train:
        text = re.sub(r"^train: .*$", "train: {" + ", ".join(f"{k}: {v}" for k, v in train.items()) + "}",
                      text, flags=re.M)
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return str(p)


def start_worker(phase: str, server: MlflowServer, storage: str, cwd, *extra, env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "scaling.cli", "sweep", "--phase-file", phase, "--device", "cpu", "--quiet",
           "--tracking-uri", server.url, "--storage", storage, *map(str, extra)]
    return subprocess.Popen(cmd, cwd=cwd, env=dict(os.environ, **ONE_THREAD, **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def phase_runs(server: MlflowServer, phase: str) -> list:
    c = MlflowClient(server.url)
    exp = c.get_experiment_by_name(f"scaling-phase-{phase}")
    return [] if exp is None else [r for r in c.search_runs([exp.experiment_id], max_results=1000)
                                   if "config_hash" in r.data.tags]


def wait_for(what, timeout: float = 180, procs=()):
    """Poll ``what()`` until it returns something true; fail if it does not in time or a process dies."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = what()
        if got:
            return got
        for p in procs:
            assert p.poll() is None, p.communicate()
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what.__name__}")


def steps_of(client, run_id: str, name: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, name))


def assert_each_config_once_and_finished(runs, n: int) -> None:
    assert len(runs) == n and all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    assert set(Counter(r.data.tags["config_hash"] for r in runs).values()) == {1}


def mirror(src: MlflowClient, phase: str, dst_uri: str) -> None:
    """Copy a phase's runs (tags, params, latest metrics, status) into another store."""
    from mlflow.entities import Metric, Param, RunTag

    dst = tracking.connect(dst_uri)
    exp = tracking.get_or_create_experiment(dst, f"scaling-phase-{phase}")
    for r in src.search_runs([src.get_experiment_by_name(f"scaling-phase-{phase}").experiment_id], max_results=1000):
        run_id = dst.create_run(exp).info.run_id
        dst.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in r.data.metrics.items()],
                      params=[Param(k, v) for k, v in r.data.params.items()],
                      tags=[RunTag(k, v) for k, v in r.data.tags.items() if k != "mlflow.parentRunId"])
        dst.set_terminated(run_id, r.info.status)


def test_three_workers_sweep_through_the_server_once_each_and_compare_matches_a_local_store(
        server, claims, tmp_path, monkeypatch):
    from scaling import report, runs_table

    phase = phase_file(tmp_path, "mh_grid", budget_kind="steps", budget=40, eval_interval=20, eval_batches=2,
                       log_interval=10, checkpoint_every=20)
    procs = [start_worker(phase, server, claims, tmp_path, "--lrs", "1e-3,3e-3,1e-2") for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "6 finished, 0 diverged, 0 failed, 0 pending" in out, out
    runs = phase_runs(server, "mh_grid")
    assert_each_config_once_and_finished(runs, 6)
    owners = Counter(r.data.tags["scaling.owner"] for r in runs)
    assert len(owners) >= 2  # the workers shared the grid
    observed(f"three workers: 6 configs FINISHED once each, trained by {sorted(owners.values())} per worker")
    assert {r.data.params["device"] for r in runs} == {"cpu"}

    searched = []
    real_search = runs_table.search
    monkeypatch.setattr(runs_table, "search", lambda *a: searched.append(a[0].tracking_uri) or real_search(*a))
    kw = dict(log_to_mlflow=False, bootstrap=50, seed=0, plots=False)
    through_server = report.compare("mh_grid", tracking_uri=server.url, **kw)
    local = f"sqlite:///{tmp_path / 'local' / 'mlflow.db'}"
    mirror(MlflowClient(server.url), "mh_grid", local)
    through_tables = report.compare("mh_grid", tracking_uri=local, **kw)
    through_database = report.compare("mh_grid", tracking_uri=server.backend_uri, **kw)  # postgresql://
    assert searched == [server.url]  # the server through search_runs, SQLite and PostgreSQL from their tables
    assert through_server["rendered"] == through_tables["rendered"] == through_database["rendered"]
    assert "mh_grid" in through_server["rendered"]
    observed("compare through the server (search_runs), of a local copy (SQLite tables) and of the server's "
             "PostgreSQL tables: the same table")


def test_search_through_the_server_keeps_its_study_in_postgres(server, claims, tmp_path):
    import optuna

    from scaling.config import load_phase
    from scaling.search import run_search

    phase = load_phase(phase_file=phase_file(tmp_path, "mh_search"))
    summary = run_search(phase, [8], 3, batch=3, storage=claims, tracking_uri=server.url, device="cpu",
                         progress=False, seed=0)
    study = optuna.load_study(study_name=summary.results[0].study_name, storage=claims)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 3
    runs = phase_runs(server, "mh_search")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" and r.data.tags["source"] == "search" for r in runs)


def test_a_worker_sigkilled_mid_run_is_resumed_by_the_others_from_its_checkpoint(server, claims, tmp_path):
    phase = phase_file(tmp_path, "mh_kill", budget_kind="steps", budget=160, eval_interval=40, eval_batches=2,
                       log_interval=10, checkpoint_every=20)
    procs = [start_worker(phase, server, claims, tmp_path) for _ in range(3)]
    client = MlflowClient(server.url)
    by_pid = {str(p.pid): p for p in procs}

    def running_with_checkpoint():
        return [r for r in phase_runs(server, "mh_kill") if r.info.status == "RUNNING"
                and r.data.tags["scaling.owner"].rpartition(":")[2] in by_pid and recorded(client, r.info.run_id)]

    try:
        victim_run = wait_for(running_with_checkpoint, procs=procs)[0]
        victim = by_pid[victim_run.data.tags["scaling.owner"].rpartition(":")[2]]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        others = [p for p in procs if p is not victim]
        outs = [p.communicate(timeout=300) for p in others]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(others, outs):
        assert p.returncode == 0, err
        assert "4 finished" in out, out
    resumed = re.search(rf"resuming run {victim_run.info.run_id} from step (\d+)", "".join(e for _, e in outs))
    assert resumed and int(resumed.group(1)) > 0  # from its checkpoint, by another worker
    observed(f"SIGKILLed worker: its run resumed by another worker from step {resumed.group(1)} of 160")
    runs = phase_runs(server, "mh_kill")
    assert_each_config_once_and_finished(runs, 4)  # nothing left RUNNING, no duplicate
    assert victim_run.info.run_id in {r.info.run_id for r in runs}
    assert steps_of(client, victim_run.info.run_id, "train_loss") == list(range(10, 161, 10))


def test_server_stopped_for_seconds_workers_wait_and_lose_no_metric_point(server, claims, tmp_path):
    phase = phase_file(tmp_path, "mh_outage", budget_kind="steps", budget=200, eval_interval=50, eval_batches=2,
                       log_interval=5, checkpoint_every=20)
    procs = [start_worker(phase, server, claims, tmp_path, "--lrs", "1e-3,1e-2", "--batch-sizes", "4")
             for _ in range(2)]
    client = MlflowClient(server.url)

    def both_logging():
        runs = [r for r in phase_runs(server, "mh_outage") if r.info.status == "RUNNING"]
        return len(runs) == 2 and all(client.get_metric_history(r.info.run_id, "train_loss") for r in runs)

    try:
        wait_for(both_logging, procs=procs)
        t = time.time()
        server.stop()
        time.sleep(3)
        server.start()
        down_s = time.time() - t
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "2 finished" in out and "error" not in err, err
    # the outage was felt and ridden out: each worker waited for the server, then went on
    assert all("tracking store is not answering" in err and "answers again" in err for _, err in outs), outs
    observed(f"server stopped {down_s:.0f} s (3 s, then its restart): workers "
             + ", ".join(re.findall(r"answers again \(after (\d+) s\)", "".join(e for _, e in outs))) + " s without it")
    runs = phase_runs(server, "mh_outage")
    assert_each_config_once_and_finished(runs, 2)
    for r in runs:  # every point once: none lost in the outage, none sent twice by a retry
        assert steps_of(client, r.info.run_id, "train_loss") == list(range(5, 201, 5))
        assert steps_of(client, r.info.run_id, "val_loss") == [50, 100, 150, 200]


def test_server_down_past_the_limit_stops_the_worker_in_one_line_and_the_next_start_resumes(
        server, claims, tmp_path, capfd):
    from scaling.config import load_phase
    from scaling.sweep import run_sweep

    train = dict(budget_kind="steps", budget=200, eval_interval=100, eval_batches=2, log_interval=5,
                 checkpoint_every=20)
    phase = phase_file(tmp_path, "mh_limit", **train)
    proc = start_worker(phase, server, claims, tmp_path, "--lrs", "1e-3", "--batch-sizes", "4",
                        env={tracking.RETRY_LIMIT_ENV: "4"})
    client = MlflowClient(server.url)

    def two_checkpoints():
        runs = phase_runs(server, "mh_limit")
        return runs and len(recorded(client, runs[0].info.run_id)) == 2 and runs[0]

    try:
        run = wait_for(two_checkpoints, procs=[proc])
        server.stop()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert "has not answered for" in errors[0] and "rerun the same command to resume" in errors[0]

    server.start()
    records = recorded(client, run.info.run_id)
    newest = server.artifacts / run.info.experiment_id / run.info.run_id / "artifacts" / records[-1].file
    newest.write_bytes(newest.read_bytes()[:100])  # and its newest checkpoint was damaged meanwhile
    capfd.readouterr()
    summary = run_sweep(load_phase(phase_file=phase).with_overrides(lrs=[1e-3], batch_sizes=[4]), device="cpu",
                        tracking_uri=server.url, storage=claims, progress=False)
    err = capfd.readouterr().err
    assert f"damaged checkpoint (step {records[-1].step}: " in err and "truncated" in err, err
    assert f"resuming run {run.info.run_id} from step {records[0].step}" in err, err
    assert summary.complete and summary.trained_now == 1
    observed(f"server down past a 4 s limit: exit 3, {errors[0]}")  # (capfd held stdout until here)
    observed(f"next start: newest checkpoint (step {records[-1].step}) truncated, resumed from step {records[0].step}")
    runs = phase_runs(server, "mh_limit")
    assert_each_config_once_and_finished(runs, 1)
    assert steps_of(client, run.info.run_id, "train_loss") == list(range(5, 201, 5))
