"""`scaling train` end to end, as a user runs it: a real subprocess, a real SQLite MLflow store."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_TEXT, run_cli
from mlflow.tracking import MlflowClient

from scaling.checkpoints import recorded

DATA = ["--data-dir", str(TINY_TEXT), "--splits", "valid:test", "--device", "cpu", "--quiet"]


def _runs(uri, phase="tiny_text"):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(f"scaling-phase-{phase}")
    return c, ([] if exp is None else c.search_runs([exp.experiment_id]))


def test_train_records_everything_in_mlflow(tmp_path, tracking_uri, tiny_text_phase):
    r = run_cli("train", "--phase-file", tiny_text_phase, "--batch-size", 8, "--lr", 3e-3, *DATA,
                "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "train on wiki.valid.tokens, validate on wiki.test.tokens" in r.stderr  # the mapping is printed
    client, runs = _runs(tracking_uri)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    p, t, m = run.data.params, run.data.tags, run.data.metrics
    assert p["batch_size"] == "8" and float(p["lr"]) == 3e-3 and p["grad_clip"] == "1.0"
    assert p["train_split"] == "valid" and p["val_split"] == "test" and p["dataset"] == "wikitext2"
    assert int(p["n_params"]) > 0 and p["device"] == "cpu" and p["converged"] == "True"
    assert len(p["dataset_fingerprint"]) == 16
    assert t["phase"] == "tiny_text" and len(t["config_hash"]) == 16 and t["source"] == "train"
    assert t["diverged"] == "false" and t["learned"] in ("true", "false")
    for k in ("final_train_loss", "final_val_loss", "train_loss_std", "avg_grad_norm_before", "avg_grad_norm_after",
              "avg_clip_frequency", "min_val_loss", "tokens_seen", "baseline_unigram_loss"):
        assert math.isfinite(m[k]), k
    assert m["avg_grad_norm_after"] <= m["avg_grad_norm_before"]
    hist = {k: client.get_metric_history(run.info.run_id, k) for k in
            ("train_loss", "val_loss", "grad_norm_before_clip", "grad_norm_after_clip", "clip_frequency",
             "effective_lr_scale", "lr", "tokens_per_s")}
    assert [x.step for x in hist["val_loss"]] == [10, 20, 30, 40]
    assert [x.step for x in hist["train_loss"]] == list(range(5, 41, 5))
    for before, after, freq in zip(hist["grad_norm_before_clip"], hist["grad_norm_after_clip"], hist["clip_frequency"]):
        assert after.value <= before.value + 1e-9
        if freq.value == 1.0:
            assert after.value <= 1.0 + 1e-6
    arts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    records = recorded(client, run.info.run_id)  # the newest two, each named by its step and checksum
    assert [r.step for r in records] == [30, 40]
    assert {"config.json", "checkpoints", *(r.file for r in records)} == arts
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.digest == p["dataset_fingerprint"]


def test_divergence_is_recorded_not_a_crash(tmp_path, tracking_uri, tiny_text_phase):
    r = run_cli("train", "--phase-file", tiny_text_phase, "--batch-size", 8, "--lr", 1e4, "--clip", "none",
                "--warmup", 0, *DATA, "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "DIVERGED" in r.stdout and "Traceback" not in r.stderr
    _, runs = _runs(tracking_uri)
    assert runs[0].info.status == "FAILED" and runs[0].data.tags["diverged"] == "true"
    assert runs[0].data.params["grad_clip"] == "none"


def _start(tmp_path, uri, phase, steps):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "scaling.cli", "train", "--phase-file", str(phase),
                             "--batch-size", "8", "--lr", "3e-3", "--steps", str(steps), "--checkpoint-every", "20",
                             *DATA, "--tracking-uri", uri], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(uri, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        client, runs = _runs(uri)
        if runs and recorded(client, runs[0].info.run_id):
            return runs[0].info.run_id
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_result(tmp_path, tiny_text_phase, sig):
    steps = 400  # the kill lands at the first checkpoint (step 20), long before the end
    uri = f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    proc = _start(tmp_path, uri, tiny_text_phase, steps)
    run_id = _wait_for_checkpoint(uri, proc)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    client, runs = _runs(uri)
    status = runs[0].info.status
    assert status == ("RUNNING" if sig == signal.SIGKILL else "KILLED")
    r = run_cli("train", "--phase-file", tiny_text_phase, "--batch-size", 8, "--lr", 3e-3, "--steps", steps,
                "--checkpoint-every", 20, *DATA, "--tracking-uri", uri, "--resume", run_id, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    _, runs = _runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    resumed = runs[0].data.metrics
    # the same configuration uninterrupted, in another store
    uri_b = f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    r = run_cli("train", "--phase-file", tiny_text_phase, "--batch-size", 8, "--lr", 3e-3, "--steps", steps,
                "--checkpoint-every", 20, *DATA, "--tracking-uri", uri_b, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    _, runs_b = _runs(uri_b)
    full = runs_b[0].data.metrics
    for k in ("final_val_loss", "final_train_loss", "train_loss_std", "avg_grad_norm_before", "avg_clip_frequency"):
        assert resumed[k] == pytest.approx(full[k], rel=1e-6), k


def test_resume_with_other_options_is_refused(tmp_path, tracking_uri, tiny_text_phase):
    r = run_cli("train", "--phase-file", tiny_text_phase, "--batch-size", 8, "--lr", 3e-3, "--steps", 10, *DATA,
                "--tracking-uri", tracking_uri, cwd=tmp_path)
    _, runs = _runs(tracking_uri)
    r = run_cli("train", "--phase-file", tiny_text_phase, "--batch-size", 8, "--lr", 1e-3, "--steps", 10, *DATA,
                "--tracking-uri", tracking_uri, "--resume", runs[0].info.run_id, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (f"error: resume: run {runs[0].info.run_id} was started with other options (lr 0.003 (now 0.001))"
            in r.stderr.strip().splitlines()[-1])


def test_resumed_run_does_not_log_its_steps_twice(tmp_path, tracking_uri, tiny_text_phase):
    """Interrupted at step 30 (train_loss logged through 30, val_loss through 30, last checkpoint 20), then
    resumed: it trains steps 21–30 again, but the store keeps one point per step."""
    from scaling.config import load_phase
    from scaling.runner import run_config

    cfg = load_phase(phase_file=tiny_text_phase).run_config(8, 3e-3, 1.0, 0, splits=("valid", "test"))

    def stop_at_30(step, val):
        if step == 30:
            raise KeyboardInterrupt

    kw = dict(device="cpu", data_dir=TINY_TEXT, tracking_uri=tracking_uri, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_config(cfg, on_eval=stop_at_30, **kw)
    client, runs = _runs(tracking_uri)
    run_id = runs[0].info.run_id
    assert runs[0].info.status == "KILLED"
    assert max(m.step for m in client.get_metric_history(run_id, "train_loss")) == 30
    run_config(cfg, resume_run_id=run_id, **kw)
    client, runs = _runs(tracking_uri)
    assert runs[0].info.status == "FINISHED"
    for name, steps in (("train_loss", list(range(5, 41, 5))), ("val_loss", [10, 20, 30, 40]),
                        ("clip_frequency", list(range(5, 41, 5)))):
        assert sorted(m.step for m in client.get_metric_history(run_id, name)) == steps, name


def test_training_commands_end_without_the_interpreter_shutdown(tmp_path, tracking_uri, tiny_text_phase):
    """As a process of its own, a command that trains ends with os._exit once its output is flushed (the
    interpreter's shutdown cost ~1 s after a compiled sweep on the GPU machine): its results and output are
    complete (stdout block-buffered into a pipe here), its exit code kept, and exit handlers do not run.
    Other commands end as usual."""
    code = ("import atexit, sys; atexit.register(print, 'exit handlers ran'); from scaling.cli import main; "
            "sys.argv[0] = 'scaling'; main()")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

    def scaling(*args):
        return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=300)

    r = scaling("train", "--phase-file", tiny_text_phase, "--batch-size", 8, "--lr", 3e-3, "--steps", 10, *DATA,
                "--tracking-uri", tracking_uri)
    assert r.returncode == 0, r.stderr
    assert "final_val_loss" in r.stdout and r.stdout.endswith("\n") and "exit handlers ran" not in r.stdout
    _, runs = _runs(tracking_uri)
    assert [x.info.status for x in runs] == ["FINISHED"] and "final_val_loss" in runs[0].data.metrics
    # no connection was closed, yet the store's write-ahead log is in its file: a copy of the .db alone is whole
    db = Path(tracking_uri[len("sqlite:///"):])
    assert not db.with_name(db.name + "-wal").exists() or db.with_name(db.name + "-wal").stat().st_size == 0
    copy = tmp_path / "copy" / "mlflow.db"
    copy.parent.mkdir()
    shutil.copy(db, copy)
    _, copied = _runs(f"sqlite:///{copy}")
    assert [x.info.status for x in copied] == ["FINISHED"] and "final_val_loss" in copied[0].data.metrics
    bad = scaling("train", "--phase-file", tiny_text_phase, "--batch-size", 0, "--lr", 3e-3, *DATA,
                  "--tracking-uri", tracking_uri)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert bad.stderr.startswith("error: ") and "exit handlers ran" not in bad.stdout
    phases = scaling("phases")
    assert phases.returncode == 0 and "2_5" in phases.stdout and phases.stdout.endswith("exit handlers ran\n")


def test_ctrl_c_exits_130_and_says_how_to_resume_and_a_resume_from_step_0_says_why(tmp_path, tiny_text_phase):
    """The run id is printed when the run starts (a kill leaves no chance later); Ctrl-C ends the command with
    exit code 130 (as shells expect after SIGINT) and the hint to resume, without click's "Aborted!"; a run
    interrupted before its first checkpoint resumes from step 0 and says why."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    opts = ["--phase-file", tiny_text_phase, "--batch-size", 8, "--lr", 3e-3, "--steps", 300,
            "--checkpoint-every", 1000, *DATA, "--tracking-uri", uri]
    proc = subprocess.Popen([sys.executable, "-m", "scaling.cli", "train", *map(str, opts)], cwd=tmp_path,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    started = ""
    while " started; " not in started:  # the line comes once the run exists, before its first step
        started = proc.stderr.readline()
        assert started or proc.poll() is None, proc.communicate()
    run_id = _runs(uri)[1][0].info.run_id
    assert started.strip() == f"run {run_id} started; if it is interrupted, continue it with --resume {run_id}"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"continue it with --resume {run_id}" in err.strip().splitlines()[-1] and "Aborted" not in err
    r = run_cli("train", *opts, "--resume", run_id, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert (f"resuming run {run_id} from step 0: it has no readable checkpoint (one is written every 1000 steps)"
            in r.stderr)
