"""Checkpoints: written atomically, recorded with a checksum, verified on resume (scaling.checkpoints)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT

from scaling import tracking
from scaling.checkpoints import KEEP, TAG_CHECKPOINTS, load_checkpoint, recorded, save_checkpoint


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client = tracking.connect(uri)
    return uri, client, tracking.get_or_create_experiment(client, "checkpoints")


def artifact(client, run_id: str, rec) -> Path:
    return Path(client.raw.get_run(run_id).info.artifact_uri.removeprefix("file://")) / rec.file


def test_saves_keep_the_newest_two_with_their_checksums(store):
    _, client, exp = store
    run_id = client.create_run(exp).info.run_id
    records = None
    for step in (10, 20, 30):
        records = save_checkpoint(client, run_id, {"step": step, "w": torch.full((50,), float(step))}, records)
    assert [r.step for r in records] == [20, 30] == [r.step for r in recorded(client, run_id)] and KEEP == 2
    on_disk = sorted(p.name for p in artifact(client, run_id, records[0]).parent.iterdir())
    assert on_disk == sorted(Path(r.file).name for r in records)  # the superseded one is gone
    assert load_checkpoint(client, run_id)["step"] == 30
    # a resumed run trains its later steps again: their records are superseded by the new ones
    records = save_checkpoint(client, run_id, {"step": 25, "w": torch.zeros(50)}, records)
    assert [r.step for r in records] == [20, 25]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_good_one_then_to_step_0(store, damage, capsys):
    _, client, exp = store
    run_id = client.create_run(exp).info.run_id
    records = None
    for step in (10, 20):
        records = save_checkpoint(client, run_id, {"step": step, "w": torch.full((50,), float(step))}, records)

    def spoil(rec):
        p = artifact(client, run_id, rec)
        data = p.read_bytes()
        if damage == "truncate":
            p.write_bytes(data[: len(data) // 2])
        elif damage == "flip":
            p.write_bytes(data[:-40] + bytes(b ^ 0xFF for b in data[-40:]))  # same size, other bytes
        else:
            p.unlink()

    spoil(records[1])
    capsys.readouterr()
    state = load_checkpoint(client, run_id)
    assert state["step"] == 10 and torch.equal(state["w"], torch.full((50,), 10.0))
    err = capsys.readouterr().err
    assert f"run {run_id}: damaged checkpoint (step 20: " in err and "previous good one, step 10" in err
    assert {"truncate": "truncated", "flip": "corrupted", "delete": "cannot be downloaded"}[damage] in err
    spoil(records[0])
    assert load_checkpoint(client, run_id) is None
    assert "no good checkpoint (step 20: " in (err := capsys.readouterr().err) and "from step 0" in err


KILLED_MID_COPY = """
import os, signal, sys, torch
from scaling import checkpoints, tracking
client = tracking.connect(sys.argv[1])

def copy_half_then_die(fin, fout, length=0):
    fout.write(fin.read(200))
    fout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

checkpoints.shutil.copyfileobj = copy_half_then_die
checkpoints.save_checkpoint(client, sys.argv[2], {"step": 20, "w": torch.ones(5000)})
"""


def test_a_kill_during_the_copy_leaves_the_previous_checkpoint_in_force(store, tmp_path):
    uri, client, exp = store
    run_id = client.create_run(exp).info.run_id
    records = save_checkpoint(client, run_id, {"step": 10, "w": torch.zeros(5000)})
    done = subprocess.run([sys.executable, "-c", KILLED_MID_COPY, uri, run_id], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == -9, done.stderr
    assert recorded(client, run_id) == records  # the record was never switched
    ckpt_dir = artifact(client, run_id, records[0]).parent
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith("step-00000020")]  # no partial file by name
    assert load_checkpoint(client, run_id)["step"] == 10
    save_checkpoint(client, run_id, {"step": 20, "w": torch.ones(5000)})  # the next save clears the leftover
    assert sorted(p.name.split("-")[1] for p in ckpt_dir.iterdir()) == ["00000010", "00000020"]


def test_a_run_written_before_records_resumes_from_its_last_pt(store, tmp_path):
    _, client, exp = store
    run_id = client.create_run(exp).info.run_id
    legacy = tmp_path / "last.pt"
    torch.save({"step": 7, "w": torch.ones(3)}, legacy)
    client.log_artifact(run_id, str(legacy), "checkpoints")
    assert load_checkpoint(client, run_id)["step"] == 7
    legacy.write_bytes(b"cut")
    client.log_artifact(run_id, str(legacy), "checkpoints")
    assert load_checkpoint(client, run_id) is None


def test_a_resumed_run_goes_on_from_the_previous_good_checkpoint(store, tiny_text_phase, capsys):
    """Killed at step 30 (checkpoints 10 and 20 recorded), its newest checkpoint damaged: the resume says
    so, trains on from step 10 and ends FINISHED with every step's metrics once."""
    from scaling.config import load_phase
    from scaling.runner import run_config

    uri, client, _ = store
    cfg = load_phase(phase_file=tiny_text_phase).run_config(8, 3e-3, 1.0, 0, splits=("valid", "test"))
    kw = dict(device="cpu", data_dir=TINY_TEXT, tracking_uri=uri, progress=False)

    def stop_at_30(step, val):
        if step == 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_config(cfg, on_eval=stop_at_30, **kw)
    exp = client.get_experiment_by_name("scaling-phase-tiny_text").experiment_id
    run_id = client.search_runs([exp])[0].info.run_id
    records = recorded(client, run_id)
    assert [r.step for r in records] == [10, 20]
    assert json.loads(client.get_run(run_id).data.tags[TAG_CHECKPOINTS])[1]["sha256"] == records[1].sha256
    p = artifact(client, run_id, records[1])
    p.write_bytes(p.read_bytes()[:64])
    capsys.readouterr()
    out = run_config(cfg, resume_run_id=run_id, **kw)
    err = capsys.readouterr().err
    assert "damaged checkpoint (step 20: " in err and f"resuming run {run_id} from step 10" in err, err
    assert out.status == "FINISHED" and out.run_id == run_id
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == list(range(5, 41, 5))
    assert [r.step for r in recorded(client, run_id)] == [30, 40]
