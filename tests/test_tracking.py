"""New SQLite stores start as a copy of an empty store MLflow migrated once (tracking.seed_sqlite_store)."""

from __future__ import annotations

import sqlite3

from mlflow.tracking import MlflowClient

from scaling import tracking


def parts(sql: str | None) -> tuple:
    """A CREATE statement's lines without their order or trailing commas: MLflow's migrations rebuild
    SQLite tables with their constraints in an order that varies from one migration to the next."""
    return tuple(sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()))


def schema(db) -> tuple:
    """The store's tables and indexes (as SQL), its schema revision and its experiments' names/locations."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")
        objects = {(t, n, tb, parts(sql)) for t, n, tb, sql in rows}
        revision = con.execute("SELECT version_num FROM alembic_version").fetchall()
        experiments = con.execute("SELECT experiment_id, name, artifact_location FROM experiments").fetchall()
        return objects, revision, experiments
    finally:
        con.close()


def test_new_store_is_the_store_mlflow_makes(tmp_path):
    own = tmp_path / "own" / "mlflow.db"  # migrated by MLflow itself
    own.parent.mkdir()
    MlflowClient(tracking_uri=f"sqlite:///{own}").search_experiments(max_results=1)
    for t in (tmp_path / "cache").glob("mlflow-*-empty-store.db"):  # the one conftest put there
        t.unlink()
    seeded = []
    for name in ("a", "b"):  # the first makes the template, the second only copies it
        db = tmp_path / name / "mlflow.db"
        db.parent.mkdir()
        assert tracking.seed_sqlite_store(db)
        assert len(list((tmp_path / "cache").glob("mlflow-*-empty-store.db"))) == 1
        tracking.connect(f"sqlite:///{db}")
        seeded.append(db)
    want_objects, want_revision, want_exps = schema(own)
    for db in seeded:
        objects, revision, exps = schema(db)
        assert objects == want_objects and revision == want_revision and len(revision) == 1
        assert exps == want_exps and [e[:2] for e in exps] == [(0, "Default")]
    # and it takes runs
    client = tracking.connect(f"sqlite:///{seeded[1]}")
    exp = tracking.get_or_create_experiment(client, "seeded")
    run = client.create_run(exp).info.run_id
    tracking.log_metrics(client, run, [("loss", 1.5, 3)])
    assert client.get_run(run).data.metrics == {"loss": 1.5}
    assert not [p.name for p in tmp_path.rglob("*") if p.name.endswith((".seed", ".tmp"))]


def test_existing_store_is_left_alone(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"")  # even an empty file: someone else's
    assert not tracking.seed_sqlite_store(db)
    assert db.read_bytes() == b""


def test_a_failing_template_leaves_the_store_to_mlflow(tmp_path, monkeypatch):
    def broken():
        raise OSError("read-only cache")

    monkeypatch.setattr(tracking, "store_template", broken)
    db = tmp_path / "s" / "mlflow.db"
    client = tracking.connect(f"sqlite:///{db}")  # MLflow migrates it itself
    assert client.search_experiments()[0].name == "Default"
    assert [p.name for p in db.parent.iterdir()] == ["mlflow.db"]


def test_only_plain_database_files_are_seeded(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tracking, "seed_sqlite_store", lambda db: calls.append(db) or False)
    monkeypatch.chdir(tmp_path)
    for uri in ("sqlite:///:memory:", f"sqlite:///{tmp_path / 'x.db'}?mode=rwc"):
        try:
            tracking.connect(uri)
        except Exception:
            pass  # whether MLflow takes these is its business; no file of ours is made for them
    assert calls == [] and not (tmp_path / ":memory:").exists()
    tracking.connect(f"sqlite:///{tmp_path / 'plain.db'}")
    assert calls == [tmp_path / "plain.db"]


def test_experiments_open_in_the_model_training_view(tmp_path):
    """MLflow's UI opens an experiment without ``mlflow.experimentKind`` in its GenAI view: new experiments get
    the tag, and one made before (without it) gets it on next use."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    new = tracking.get_or_create_experiment(client, "scaling-phase-a")
    old = client.create_experiment("scaling-phase-b")
    assert tracking.get_or_create_experiment(client, "scaling-phase-b") == old
    for exp_id in (new, old):
        assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
