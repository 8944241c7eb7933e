"""scaling import: results tables → FINISHED MLflow runs; idempotent, all-or-nothing, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import LOCAL_WIKITEXT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scaling import importing, tracking
from scaling.config import ConfigError, load_phase

FIXTURES = Path(__file__).parent / "fixtures"
STUDY = FIXTURES / "study_phase_2_5.csv"
DEFECT = FIXTURES / "phase_3a_like_clip_defect.csv"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("SCALING_DATA_DIR", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.seed_sqlite_store(tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


def runs_of(uri, phase):
    client = tracking.connect(uri)
    exp = client.get_experiment_by_name(tracking.experiment_name(phase))
    return [] if exp is None else tracking.search_runs(client, [exp.experiment_id])


def test_study_table_becomes_native_looking_runs(store):
    s = importing.import_table(STUDY, "2_5", tracking_uri=store)
    assert (s.rows, s.created, s.skipped) == (20, 20, 0)
    assert s.learned == {"true": 0, "false": 0, "unknown": 20} and "baselines unknown" in s.baselines_note
    runs = runs_of(store, "2_5")
    assert len(runs) == 20 and all(r.info.status == "FINISHED" for r in runs)
    by_line = {int(r.data.tags["import_row"]): r for r in runs}
    assert sorted(by_line) == list(range(2, 22))
    r = by_line[4]  # 32,0.001,4.4270,4.4391,0.0042,True,10000
    t, p, m = r.data.tags, r.data.params, r.data.metrics
    assert t["source"] == "import" and t["phase"] == "2_5" and t["import_file"] == STUDY.name
    assert t["learned"] == "unknown" and t["diverged"] == "false" and t["converged"] == "true"
    assert t["config_hash"] == load_phase("2_5").run_config(32, 0.001, 1.0).config_hash()
    assert (p["batch_size"], float(p["lr"]), p["grad_clip"], p["steps"], p["budget_kind"]) == ("32", 0.001, "1.0", "10000", "steps")
    assert m["final_val_loss"] == 4.4391 and m["final_train_loss"] == 4.4270 and m["train_loss_std"] == 0.0042
    assert m["tokens_seen"] == 10000 * 32 * 128
    assert "baseline_unigram_loss" not in m


def test_importing_twice_creates_nothing(store):
    importing.import_table(STUDY, "2_5", tracking_uri=store)
    again = importing.import_table(STUDY, "2_5", tracking_uri=store)
    assert (again.created, again.skipped) == (0, 20)
    assert len(runs_of(store, "2_5")) == 20


def test_a_bad_row_imports_nothing_and_names_its_line(store, tmp_path):
    lines = STUDY.read_text().splitlines()
    lines[7] = "64,0.0003,4.5897,oops,0.0020,True,10000"  # line 8 of the file
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"^bad.csv line 8: final_val_loss must be a number, got 'oops'$"):
        importing.import_table(bad, "2_5", tracking_uri=store)
    lines[7] = "64,,4.5897,4.5987,0.0020,True,10000"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="line 8: required field 'lr' is missing"):
        importing.import_table(bad, "2_5", tracking_uri=store)
    assert runs_of(store, "2_5") == []


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a CSV file"),
    (b'{"batch_size": 32, "lr": 0.001}', "not a results CSV"),
    (b"", "not a CSV file"),
    (b"batch_size,lr,final_val_loss\n", "no data rows"),
])
def test_a_file_that_is_not_a_results_csv_is_one_line(store, tmp_path, content, message):
    f = tmp_path / "results.json"
    f.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as e:
        importing.import_table(f, "2_5", tracking_uri=store)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="import file not found"):
        importing.import_table(tmp_path / "missing.csv", "2_5", tracking_uri=store)
    with pytest.raises(ConfigError, match="unknown phase"):
        importing.import_table(STUDY, "9z", tracking_uri=store)


def test_optional_clip_columns_diverged_rows_and_unknown_columns(store, tmp_path):
    s = importing.import_table(DEFECT, "3a", tracking_uri=store)
    assert s.created == 10
    r = next(r for r in runs_of(store, "3a") if r.data.params["lr"] == "0.03" and r.data.params["batch_size"] == "128")
    assert r.data.metrics["avg_clip_frequency"] == 1.0
    assert r.data.metrics["avg_grad_norm_after"] == r.data.metrics["avg_grad_norm_before"] == 3.3907
    assert r.data.params["grad_clip"] == "1.0" and r.data.params["steps"] == "5000"
    f = tmp_path / "mixed.csv"
    f.write_text("batch_size,lr,final_val_loss,converged,num_steps,gradient_clip,optimizer_note\n"
                 "32,0.001,2.1,True,300,none,adamw-fused\n"
                 "32,0.1,nan,False,300,none,adamw-fused\n")
    s2 = importing.import_table(f, "2_5", tracking_uri=store)
    assert s2.created == 2 and s2.learned["false"] == 1
    runs = {r.data.params["lr"]: r for r in runs_of(store, "2_5")}
    ok, div = runs["0.001"], runs["0.1"]
    assert ok.data.params["grad_clip"] == "none" and ok.data.params["steps"] == "300"
    assert ok.data.params["optimizer_note"] == "adamw-fused"  # unknown columns are kept as params
    assert ok.data.tags["config_hash"] == load_phase("2_5").with_overrides(steps=300).run_config(
        32, 0.001, None).config_hash()
    assert div.info.status == "FAILED" and div.data.tags["diverged"] == "true"
    assert "final_val_loss" not in div.data.metrics


def test_phase_file(store, tmp_path):
    pf = tmp_path / "mine.yaml"
    pf.write_text("name: mine\ndata: {dataset: random}\ntrain: {budget_kind: steps, budget: 100}\n"
                  "grid: {batch_sizes: [32], lrs: [0.001]}\n")
    f = tmp_path / "t.csv"
    f.write_text("batch_size,lr,final_val_loss\n32,0.001,4.0\n")
    s = importing.import_table(f, None, tracking_uri=store, phase_file=pf)
    assert s.phase == "mine" and s.created == 1
    assert s.baselines is not None and s.learned["true"] == 1  # random tokens: baselines always available
    with pytest.raises(ConfigError, match="does not match"):
        importing.import_table(f, "2_5", tracking_uri=store, phase_file=pf)


@pytest.mark.skipif(not LOCAL_WIKITEXT.is_dir(), reason="no local WikiText-2 copy")
def test_study_runs_did_not_learn_given_the_local_dataset(store):
    s = importing.import_table(STUDY, "2_5", tracking_uri=store, data_dir=LOCAL_WIKITEXT,
                               splits=("valid", "test"))
    assert s.baselines and 3.0 < s.baselines["baseline_unigram_loss"] < 3.4
    assert s.learned == {"true": 0, "false": 20, "unknown": 0}
    r = runs_of(store, "2_5")[0]
    assert r.data.tags["learned"] == "false" and "baseline_bigram_loss" in r.data.metrics
    assert r.data.params["train_split"] == "valid" and r.data.params["val_split"] == "test"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet="0123456789.-eE+naifNA ,x", max_size=8), st.text(alphabet="0123456789.-eE+nainf", max_size=8))
def test_row_parser_accepts_numbers_and_rejects_anything_else_by_line(tmp_path, b, lr):
    f = tmp_path / "h.csv"
    f.write_text(f"batch_size,lr,final_val_loss\n32,0.001,4.0\n\"{b}\",\"{lr}\",4.1\n")
    try:
        rows = importing.read_table(f, "2_5")
    except ConfigError as e:
        msg = str(e)
        assert msg.startswith("h.csv line 3: ") and "\n" not in msg
        return
    r = rows[1]
    assert r.batch_size >= 1 and r.lr > 0 and float(b) == r.batch_size and float(lr) == r.lr


def test_runs_created_at_once_are_all_or_nothing_too(store, monkeypatch):
    """Several runs at once (as through a server): a store error midway deletes every run created, those
    of the other threads included; without an error they are the same runs as one at a time."""
    real = importing._ImportBatch.create
    calls = []

    def fails_at_the_seventh(self, r, cfg):
        calls.append(r.line)
        if len(calls) == 7:
            raise OSError("connection reset")
        return real(self, r, cfg)

    monkeypatch.setattr(importing._ImportBatch, "create", fails_at_the_seventh)
    with pytest.raises(tracking.TrackingError, match="import failed, nothing imported: connection reset"):
        importing.import_table(STUDY, "2_5", tracking_uri=store, jobs=3)
    assert runs_of(store, "2_5") == []
    monkeypatch.setattr(importing._ImportBatch, "create", real)
    s = importing.import_table(STUDY, "2_5", tracking_uri=store, jobs=3)
    assert (s.created, s.skipped) == (20, 0) and s.learned["unknown"] == 20
    assert sorted(int(r.data.tags["import_row"]) for r in runs_of(store, "2_5")) == list(range(2, 22))
    assert importing.import_jobs("sqlite:///x.db") == 1 and importing.import_jobs("http://host:5000") > 1
