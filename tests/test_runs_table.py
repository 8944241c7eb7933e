"""Reading only what is needed: runs straight from a SQL store's tables give exactly what MLflow's
search_runs gives (scaling.runs_table), and a sweep's "what is done?" pass asks per configuration."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from scaling import report, runs_table, tracking
from scaling.runs_table import Columns

COLUMNS = Columns(params=("batch_size", "lr", "absent"), tags=("source", "diverged"),
                  metrics=("final_val_loss", "min_val_loss", "absent"))


@pytest.fixture
def store(tmp_path):
    client = tracking.connect(f"sqlite:///{tmp_path / 'm' / 'mlflow.db'}")
    exp = tracking.get_or_create_experiment(client, "scaling-phase-rt")
    other = tracking.get_or_create_experiment(client, "scaling-phase-other")
    runs = []
    for i, (loss, source) in enumerate([(1.5, "sweep"), (float("nan"), "import"), (float("inf"), "sweep"),
                                        (2.0, "import"), (None, "train")]):
        r = client.create_run(exp, start_time=1000 + i // 2).info.run_id  # ties in start time, too
        metrics = [] if loss is None else [("final_val_loss", loss, 10), ("final_val_loss", 9.0, 5)]
        tracking.log_record(client, r, params={"batch_size": 4 * (i + 1), "lr": 1e-3, "extra": "x"},
                            metrics=metrics + [("min_val_loss", 1.0 + i, 3)],
                            tags={"source": source, "diverged": str(loss == float("inf")).lower()})
        client.set_terminated(r, "FAILED" if loss == float("inf") else "FINISHED")
        runs.append(r)
    client.delete_run(runs[3])  # deleted runs are not read
    client.create_run(other)  # nor other experiments'
    parent = client.create_run(exp, tags={"scaling.role": "sweep"}).info.run_id  # no params
    return client, exp, runs, parent


def as_tuples(records):
    def norm(v):
        return "nan" if isinstance(v, float) and math.isnan(v) else v
    return [(r.run_id, r.status, r.start_time, r.params, r.tags, {k: norm(v) for k, v in r.metrics.items()})
            for r in records]


def test_the_tables_give_what_search_runs_gives(store):
    client, exp, runs, parent = store
    direct = runs_table.read_tables(client.tracking_uri, exp, COLUMNS, {})
    searched = runs_table.search(client, exp, COLUMNS, {})
    assert as_tuples(direct) == as_tuples(searched)
    assert [r.run_id for r in direct][-1] != parent and len(direct) == 5 and runs[3] not in {r.run_id for r in direct}
    by_id = {r.run_id: r for r in direct}
    assert by_id[runs[0]].metrics == {"final_val_loss": 1.5, "min_val_loss": 1.0}  # the latest step's value
    assert by_id[runs[2]].metrics["final_val_loss"] == 1.7976931348623157e308  # inf, as MLflow stores it
    assert "extra" not in by_id[runs[0]].params and by_id[parent].params == {}
    only = runs_table.read_tables(client.tracking_uri, exp, COLUMNS, {"source": "import"})
    assert as_tuples(only) == as_tuples(runs_table.search(client, exp, COLUMNS, {"source": "import"}))
    assert [r.run_id for r in only] == [runs[1]]


def test_compare_loads_the_same_frame_either_way(store, monkeypatch):
    client, exp, *_ = store
    direct = report.load_runs(client, ["rt"])
    monkeypatch.setattr(runs_table, "database_uri", lambda uri: None)  # as through a server
    searched = report.load_runs(client, ["rt"])
    pd.testing.assert_frame_equal(direct, searched)


def test_a_direct_read_that_fails_falls_back_to_search_runs(store, monkeypatch, capsys):
    client, exp, *_ = store

    def unknown_schema(*a):
        raise RuntimeError("no such column: runs.start_time")

    monkeypatch.setattr(runs_table, "read_tables", unknown_schema)
    got = runs_table.fetch_runs(client, exp, COLUMNS)
    assert as_tuples(got) == as_tuples(runs_table.search(client, exp, COLUMNS, {}))
    assert "note: runs read through MLflow (no such column" in capsys.readouterr().err


def test_metric_history_of_chosen_runs_is_what_mlflow_gives(store, monkeypatch):
    client, _, runs, _ = store
    for step, v in ((5, 2.0), (10, float("nan")), (15, 4.0)):
        tracking.log_record(client, runs[0], metrics=[("gns_b_simple", v, step)])
    tracking.log_record(client, runs[1], metrics=[("gns_b_simple", 7.0, 5)])
    tracking.log_record(client, runs[2], metrics=[("gns_b_simple", 9.0, 5)])  # not asked for
    asked = [runs[1], runs[0], runs[4]]
    norm = lambda pts: [(p.run_id, p.step, p.timestamp, "nan" if math.isnan(p.value) else p.value) for p in pts]
    direct = runs_table.fetch_metric_history(client, asked, "gns_b_simple")
    monkeypatch.setattr(runs_table, "database_uri", lambda uri: None)  # as through a server
    assert norm(direct) == norm(runs_table.fetch_metric_history(client, asked, "gns_b_simple"))
    assert sorted({p.run_id for p in direct}) == sorted(runs[:2])
    assert [(p.step, p.value) for p in direct if p.run_id == runs[0]][::2] == [(5, 2.0), (15, 4.0)]


def test_the_done_pass_asks_per_config_and_not_again_once_done(tmp_path, tiny_random_phase, one_thread):
    """grid_status queries the runs of each configuration by its config_hash tag (never the whole
    experiment), and with a GridView it does not ask again about configurations found done."""
    from scaling import sweep
    from scaling.config import load_phase

    uri = f"sqlite:///{tmp_path / 'm' / 'mlflow.db'}"
    phase = load_phase(phase_file=tiny_random_phase).with_overrides(steps=5, batch_sizes=[4], lrs=[1e-3, 1e-2])
    sweep.run_sweep(phase.with_overrides(lrs=[1e-3]), device="cpu", tracking_uri=uri, progress=False)
    client = tracking.connect(uri)
    exp = client.get_experiment_by_name("scaling-phase-tiny_random").experiment_id
    asked = []
    real = client.raw.search_runs
    client.raw.search_runs = lambda ids, filter_string="", **kw: asked.append(filter_string) or real(
        ids, filter_string=filter_string, **kw)
    cfgs = sweep.plan(phase)
    view = sweep.GridView()
    first = sweep.grid_status(client, exp, cfgs, view=view)
    assert [s.state for s in first.values()] == ["FINISHED", "PENDING"]
    assert sorted(asked) == sorted(f"tags.config_hash = '{c.config_hash()}'" for c in cfgs)
    asked.clear()
    sweep.grid_status(client, exp, cfgs, view=view)
    assert asked == [f"tags.config_hash = '{cfgs[1].config_hash()}'"]


