"""The background checkpoint writer: snapshots at hand-over, order kept, everything written by close()."""

from __future__ import annotations

import torch

from scaling import tracking
from scaling.runner import CheckpointWriter, load_checkpoint


def test_writer_snapshots_keeps_order_and_drains(tmp_path):
    tracking.seed_sqlite_store(tmp_path / "mlflow.db")
    client = tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.get_or_create_experiment(client, "writer-test")
    runs = [client.create_run(exp).info.run_id for _ in range(2)]
    w = torch.zeros(3, 4)
    writer = CheckpointWriter(client, max_pending=2)  # smaller than what is put: put() must wait, not drop
    for step in range(1, 6):
        w.fill_(step)  # the live tensor changes after every hand-over, as training does
        for r in runs:
            writer.put(r, {"model": {"w": w}, "step": step, "nested": [w.sum(), {"s": torch.tensor(step)}]})
    w.fill_(-1.0)
    writer.close()
    assert writer.error is None
    for r in runs:
        state = load_checkpoint(client, r)
        assert state["step"] == 5  # the newest one, not one written out of order
        assert torch.equal(state["model"]["w"], torch.full((3, 4), 5.0))  # the value at hand-over
        assert float(state["nested"][0]) == 60.0 and int(state["nested"][1]["s"]) == 5


def test_a_run_whose_last_checkpoint_is_lost_says_so(tmp_path, tiny_random_phase, monkeypatch, capsys):
    """The final checkpoint is written after training, in the background: if it cannot be written (here
    by an error without a message, which once broke the report) the run's results stand (FINISHED), but
    the tag ``scaling.checkpoint_lost`` and a warning naming the run say that its final state is missing."""
    from scaling import runner
    from scaling.config import load_phase

    tracking.seed_sqlite_store(tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_phase(phase_file=tiny_random_phase).run_config(4, 1e-3)
    real = runner.save_checkpoint

    def full_disk_at_the_end(client, run_id, state, records=None):
        if state["step"] == cfg.steps:
            raise OSError()
        return real(client, run_id, state, records)

    monkeypatch.setattr(runner, "save_checkpoint", full_disk_at_the_end)
    out = runner.run_config(cfg, device="cpu", tracking_uri=uri, progress=False)
    run = tracking.connect(uri).get_run(out.run_id)
    assert out.status == "FINISHED" and run.info.status == "FINISHED"
    assert run.data.tags["scaling.checkpoint_lost"] == "OSError"
    assert f"warning: run {out.run_id}: its last checkpoint was not written" in capsys.readouterr().err
    assert "final_val_loss" in run.data.metrics
    assert load_checkpoint(tracking.connect(uri), out.run_id)["step"] == 10  # the one before it stays


def test_a_checkpoint_is_saved_only_after_the_metric_rows_put_before_it(monkeypatch):
    """A resume logs only steps after the last logged one: a checkpoint recorded while older rows were
    still queued (then lost to a kill or an outage) would leave a hole in the run's metrics for good."""
    import threading

    from scaling import runner

    events, gate = [], threading.Event()

    class SlowStore:
        def log_batch(self, run_id, metrics=(), params=(), tags=()):
            gate.wait(30)
            events.append(("metrics", max(m.step for m in metrics)))

    monkeypatch.setattr(runner, "save_checkpoint",
                        lambda client, run_id, state, records=None: events.append(("checkpoint", state["step"])))
    sink = runner.MetricSink(SlowStore())
    writer = runner.CheckpointWriter(SlowStore(), sink=sink)
    sink.put("r", 10, {"train_loss": 1.0})
    writer.put("r", {"step": 10, "w": torch.zeros(2)})
    sink.put("r", 15, {"train_loss": 0.9})  # after the checkpoint: not waited for
    gate.set()
    sink.close()
    writer.close()
    assert events.index(("checkpoint", 10)) > events.index(("metrics", 10)), events
