"""Grid sweeps end to end: real `scaling sweep` subprocesses on temp SQLite stores (MLflow + claims)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from click.testing import CliRunner
from conftest import run_cli
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from scaling import tracking
from scaling.checkpoints import recorded

QUICK = ["--device", "cpu", "--quiet"]
# One BLAS/OpenMP thread per process: on 2 shared cores torch's default threads make tiny models ~40x slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def phase_runs(uri, phase="tiny_random"):
    """(sweep parents, children) of the phase experiment, active runs only."""
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(f"scaling-phase-{phase}")
    runs = [] if exp is None else c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("scaling.role") == "sweep"]
    children = [r for r in runs if "config_hash" in r.data.tags]
    return parents, children


def rerun(phase_file, uri, storage, **overrides):
    from scaling.config import load_phase
    from scaling.sweep import run_sweep

    phase = load_phase(phase_file=phase_file).with_overrides(**overrides)
    return run_sweep(phase, device="cpu", tracking_uri=uri, storage=storage, progress=False)


def sweep_cmd(phase_file, uri, storage, *extra):
    return [sys.executable, "-m", "scaling.cli", "sweep", "--phase-file", str(phase_file), *QUICK,
            "--tracking-uri", uri, "--storage", storage, *map(str, extra)]


def test_quick_2x2_sweep_one_parent_four_children_and_rerun_creates_none(tmp_path, tiny_random_phase, stores,
                                                                         one_thread):
    uri, storage = stores
    r = run_cli("sweep", "--phase-file", tiny_random_phase, *QUICK, "--tracking-uri", uri, "--storage", storage,
                cwd=tmp_path, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "4 finished, 0 diverged, 0 failed, 0 pending; 4 trained" in r.stdout
    assert "best LR at B=4" in r.stdout and "best LR at B=8" in r.stdout
    # random tokens hold nothing to learn: that is said before any advice about the best LRs
    lines = r.stdout.splitlines()
    assert "no run learned" in lines[1] and "(no run at this batch size learned)" in lines[2]
    parents, children = phase_runs(uri)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_finished"] == 4
    assert "best_lr_B4" in parent.data.metrics and parent.data.params["grid_lrs"] == "0.001,0.01"
    sweep_id = parent.data.tags["scaling.sweep_id"]
    for c in children:
        assert c.info.status == "FINISHED"
        assert c.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert c.data.tags["source"] == "sweep" and c.data.tags["scaling.sweep_id"] == sweep_id
    grid = {(c.data.params["batch_size"], float(c.data.params["lr"])) for c in children}
    assert grid == {("4", 1e-3), ("4", 1e-2), ("8", 1e-3), ("8", 1e-2)}
    assert len({c.data.tags["config_hash"] for c in children}) == 4

    again = rerun(tiny_random_phase, uri, storage)  # in-process: the same code path, no second start-up
    assert again.trained_now == 0 and again.complete and again.parent_run_id == parent.info.run_id
    parents2, children2 = phase_runs(uri)
    assert [p.info.run_id for p in parents2] == [parent.info.run_id]  # re-attached to the same parent
    assert {c.info.run_id for c in children2} == {c.info.run_id for c in children}


def test_ctrl_c_stops_the_sweep_with_exit_130_and_says_to_rerun(tmp_path, tiny_random_phase, stores):
    """SIGINT mid-sweep: exit code 130, "rerun the same command" (a sweep has no --resume), no "Aborted!"."""
    uri, storage = stores
    proc = subprocess.Popen(sweep_cmd(tiny_random_phase, uri, storage, "--steps", 3000), cwd=tmp_path,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **ONE_THREAD), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(c.data.params for c in phase_runs(uri)[1]) and time.time() < deadline:  # training, not set up
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "rerun the same command to resume it" in err and "--resume" not in err and "Aborted" not in err
    assert [c.info.status for c in phase_runs(uri)[1]] == ["KILLED"]


def test_sigkill_midway_then_rerun_finishes_only_the_remaining_configs(tmp_path, tiny_random_phase, stores,
                                                                      one_thread, capfd):
    uri, storage = stores
    slow = ["--steps", 300, "--checkpoint-every", 20, "--eval-interval", 100, "--log-interval", 20]
    proc = subprocess.Popen(sweep_cmd(tiny_random_phase, uri, storage, *slow), cwd=tmp_path,
                            env=dict(os.environ, **ONE_THREAD), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient(uri)
    deadline = time.time() + 150
    victim = None
    try:
        while time.time() < deadline and proc.poll() is None:
            _, children = phase_runs(uri)
            running = [c for c in children if c.info.status == "RUNNING"]
            if any(c.info.status == "FINISHED" for c in children) and running:
                if recorded(client, running[0].info.run_id):
                    victim = running[0].info.run_id
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.2)
    finally:
        if proc.poll() is None and victim is None:
            proc.kill()
        proc.wait()
    assert victim is not None, "the sweep ended before it could be killed mid-run"

    parents, before = phase_runs(uri)
    assert len(parents) == 1
    by_id = {c.info.run_id: c for c in before}
    assert by_id[victim].info.status == "RUNNING"  # SIGKILL: left RUNNING, owner dead
    finished_before = {c.info.run_id: c.info.end_time for c in before if c.info.status == "FINISHED"}
    assert 1 <= len(finished_before) <= 3

    summary = rerun(tiny_random_phase, uri, storage, steps=300, checkpoint_every=20, eval_interval=100,
                    log_interval=20)
    err = capfd.readouterr().err
    m = re.search(rf"resuming run {victim} from step (\d+)", err)
    assert m and int(m.group(1)) > 0, err  # from its checkpoint, not from scratch
    parents2, after = phase_runs(uri)
    assert [p.info.run_id for p in parents2] == [parents[0].info.run_id]
    assert parents2[0].info.status == "FINISHED"
    assert len(after) == 4 and all(c.info.status == "FINISHED" for c in after)
    assert Counter(c.data.tags["config_hash"] for c in after).most_common(1)[0][1] == 1
    for run_id, end in finished_before.items():  # finished results untouched, not retrained
        assert {c.info.run_id: c.info.end_time for c in after}[run_id] == end
    n_new = len({c.info.run_id for c in after} - set(by_id))
    assert n_new == 4 - len(before)
    assert summary.complete and summary.trained_now == 4 - len(finished_before)


def test_two_worker_processes_on_one_sqlite_store_train_each_config_once(tmp_path, tiny_random_phase, stores):
    """Two sweeps started at once on one store (as on two machines), the first with `--workers 2`: three
    claim loops race for a 2x3 grid and for creating its parent run."""
    uri, storage = stores
    cmd = sweep_cmd(tiny_random_phase, uri, storage, "--lrs", "1e-3,3e-3,1e-2")
    env = dict(os.environ, PYTHONUNBUFFERED="1", **ONE_THREAD)
    procs = [subprocess.Popen(cmd + extra, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for extra in (["--workers", "2"], [])]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "6 finished" in out
    parents, children = phase_runs(uri)
    assert len(parents) == 1
    assert len(children) == 6 and all(c.info.status == "FINISHED" for c in children)
    per_config = Counter(c.data.tags["config_hash"] for c in children)
    assert len(per_config) == 6 and set(per_config.values()) == {1}  # no config trained twice
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    # A parent that lost the creation race was deleted, never left as a second active parent.
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("scaling-phase-tiny_random")
    everything = c.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)
    assert sum(r.data.tags.get("scaling.role") == "sweep" and r.info.lifecycle_stage == "active"
               for r in everything) == 1


def test_diverged_config_counts_as_done_and_failed_ones_wait_for_retry(tmp_path, tiny_random_phase, stores,
                                                                        one_thread):
    from scaling.config import load_phase
    from scaling.sweep import plan, run_sweep

    uri, storage = stores
    phase = load_phase(phase_file=tiny_random_phase).with_overrides(batch_sizes=[4], lrs=[1e-3, 1e6, 3e-3],
                                                                    clips=[None])
    # A FAILED (not diverged) run of the third config, e.g. an out-of-memory crash.
    failed_cfg = plan(phase)[2]
    client = MlflowClient(uri)
    exp_id = tracking.get_or_create_experiment(client, tracking.experiment_name(phase.name))
    crashed = client.create_run(exp_id, tags={"config_hash": failed_cfg.config_hash(), "diverged": "false",
                                              "phase": phase.name}).info.run_id
    client.set_terminated(crashed, "FAILED")

    s = run_sweep(phase, device="cpu", tracking_uri=uri, storage=storage, progress=False)
    assert (s.count("FINISHED"), s.count("DIVERGED"), s.count("FAILED")) == (1, 1, 1)
    assert not s.complete and s.losses()[(4, 1e6, None, 0)] == float("inf")
    assert client.get_run(s.parent_run_id).info.status == "FAILED"
    _, children = phase_runs(uri)
    diverged = [c for c in children if c.data.tags.get("diverged") == "true"]
    assert len(diverged) == 1 and diverged[0].info.status == "FAILED"

    s2 = run_sweep(phase, device="cpu", tracking_uri=uri, storage=storage, progress=False)
    assert s2.trained_now == 0 and s2.count("FAILED") == 1  # not retried without retry_failed
    s3 = run_sweep(phase, device="cpu", tracking_uri=uri, storage=storage, progress=False, retry_failed=True)
    assert s3.complete and s3.trained_now == 1 and s3.count("DIVERGED") == 1
    assert client.get_run(s3.parent_run_id).info.status == "FINISHED"
    assert client.get_run(crashed).info.status == "FAILED"  # a fresh run, the crashed one kept as it was


@pytest.mark.parametrize("args", [["--workers", "0"], ["--storage", "nodb://x"], ["--lrs", "-1"],
                                  ["--batch-sizes", "0"]])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(tmp_path, tiny_random_phase, args, monkeypatch):
    from scaling.cli import main

    monkeypatch.chdir(tmp_path)
    base = ["sweep", *QUICK, "--tracking-uri", f"sqlite:///{tmp_path / 'm' / 'mlflow.db'}"]
    r = CliRunner().invoke(main, base + ["--phase-file", str(tiny_random_phase)] + args)
    assert r.exit_code == 2, r.output
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), r.stderr
    assert not [p for p in tmp_path.rglob("*.db") if p.parent != tmp_path / "cache"]  # (conftest's store template)


def test_a_claimed_group_can_be_trained_in_one_pass_by_the_batched_engine(tmp_path, tiny_random_phase, stores,
                                                                          one_thread):
    from scaling.config import load_phase
    from scaling.sweep import run_sweep, train_grouped

    uri, storage = stores
    phase = load_phase(phase_file=tiny_random_phase)
    s = run_sweep(phase, device="cpu", tracking_uri=uri, storage=storage, progress=False, engine=train_grouped,
                  group_size=4)
    assert s.complete and s.trained_now == 4
    parents, children = phase_runs(uri)
    assert len(parents) == 1 and len(children) == 4
    assert all(c.info.status == "FINISHED" and c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
               and c.data.tags["scaling.compile"] == "off" for c in children)
    # the group's timings, the same on each of its runs: compile (first ticks) and steady step apart
    timing = {k: v for k, v in children[0].data.metrics.items() if k.startswith("group_")}
    assert set(timing) == {"group_configs", "group_setup_s", "group_first_ticks_s", "group_step_ms",
                           "group_eval_s", "group_wall_s"}, timing
    assert timing["group_configs"] == 4 and all(v > 0 for v in timing.values())
    assert timing["group_setup_s"] + timing["group_first_ticks_s"] + timing["group_eval_s"] < timing["group_wall_s"]
    assert all({k: v for k, v in c.data.metrics.items() if k.startswith("group_")} == timing for c in children)
    assert rerun(tiny_random_phase, uri, storage).trained_now == 0  # the sequential engine sees them done


RACE = """
import json, os, sys, time
from scaling.sweep import ClaimStore
from scaling.tracking import owner_id

url, start_at, hashes, barrier = sys.argv[1], float(sys.argv[2]), sys.argv[3].split(","), sys.argv[4]
store = ClaimStore(url)
k = os.getpid() % len(hashes)
hashes = hashes[k:] + hashes[:k]  # each process in its own order
while time.time() < start_at:
    time.sleep(0.001)
won = []
for h in hashes:
    if store.try_claim("race", h, owner_id(), h) is not None:
        won.append(h)
    time.sleep(0.002)  # let the others in: the claims interleave
print(json.dumps(won), flush=True)
# Stay alive until every racer is done, as a worker holding claims does: a claim whose owner process
# has exited is a dead owner's, which another worker may rightly take over.
open(os.path.join(barrier, str(os.getpid())), "w").close()
deadline = time.time() + 60
while len(os.listdir(barrier)) < 4 and time.time() < deadline:
    time.sleep(0.01)
"""


def test_claims_are_atomic_when_processes_race_for_the_same_configs(tmp_path):
    """The exactly-once guarantee itself: 4 processes (owners host:pid, as sweep workers) claim the same
    200 configs at the same moment, first fresh ones (insert), then ones whose owner died (compare-and-swap)."""
    import json

    from scaling.sweep import ClaimStore

    url = f"sqlite:///{tmp_path / 'claims.db'}"
    fresh = [f"fresh{i:03d}" for i in range(100)]
    orphaned = [f"orphan{i:03d}" for i in range(100)]
    dead = subprocess.Popen(["true"])
    dead.wait()
    store = ClaimStore(url)
    for h in orphaned:  # claimed by a process that is gone
        assert store.try_claim("race", h, f"{os.uname().nodename}:{dead.pid}", h) is not None
    start_at = time.time() + 3
    barrier = tmp_path / "done"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", RACE, url, str(start_at), ",".join(fresh + orphaned),
                               str(barrier)],
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    winners = Counter(h for won in results for h in won)
    assert set(winners) == set(fresh + orphaned) and set(winners.values()) == {1}
    assert sum(bool(won) for won in results) >= 2  # they did race


def test_the_summary_keeps_each_variants_best_lr_apart():
    """A ladder's sizes (or a modular phase's tasks) have losses on different scales: the best LR at a batch
    size is taken within each variant, never across them."""
    from scaling.sweep import ConfigResult, SweepSummary

    def done(lr, loss, variant):
        return ConfigResult("h", 16, lr, 1.0, 0, "FINISHED", loss=loss, learned=True, variant=variant)

    s = SweepSummary("s", "p", "ladder", "db", results=[
        done(1e-3, 2.6, "size=xs"), done(3e-3, 2.5, "size=xs"), done(1e-2, 2.7, "size=xs"),
        done(1e-3, 1.45, "size=l"), done(3e-3, 1.39, "size=l"), done(1e-2, 1.40, "size=l")])
    best = [line.strip() for line in s.lines() if "best LR" in line]
    assert best == ["best LR at B=16 size=l: 0.003 (final_val_loss 1.3900)",
                    "best LR at B=16 size=xs: 0.003 (final_val_loss 2.5000)"]
    assert s.best_lr == {}  # no batch-size-only answer for a phase with variants
