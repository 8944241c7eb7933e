"""Equal data across batch sizes: the built-in `2_5_tokens` phase, a quick sweep on CPU, end to end."""

from __future__ import annotations

from conftest import TINY_TEXT, run_cli
from mlflow.tracking import MlflowClient


def test_quick_2_5_tokens_sweep_sees_equal_tokens_and_compare_knows_the_budget(tmp_path, tracking_uri):
    common = ["--phase", "2_5_tokens", "--tokens", 8192, "--batch-sizes", "32,64", "--lrs", "1e-3,3e-3",
              "--eval-batches", 1, "--eval-interval", 1, "--log-interval", 1, "--checkpoint-every", 1,
              "--device", "cpu", "--data-dir", TINY_TEXT, "--splits", "valid:test", "--quiet",
              "--tracking-uri", tracking_uri, "--storage", f"sqlite:///{tmp_path / 'sweeps.db'}"]
    r = run_cli("sweep", *common, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    c = MlflowClient(tracking_uri)
    exp = c.get_experiment_by_name("scaling-phase-2_5_tokens")
    runs = [x for x in c.search_runs([exp.experiment_id]) if "batch_size" in x.data.params]
    assert len(runs) == 4 and all(x.info.status == "FINISHED" for x in runs)
    steps = {int(x.data.params["batch_size"]): int(x.data.params["steps"]) for x in runs}
    assert steps == {32: 2, 64: 1}  # 8192 tokens / (B x 128)
    assert {x.data.metrics["tokens_seen"] for x in runs} == {8192.0}
    assert {x.data.params["budget_kind"] for x in runs} == {"tokens"}
    r = run_cli("compare", "--phases", "2_5_tokens", "--format", "json", "--no-mlflow", "--bootstrap", 0,
                "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    import json
    report = json.loads(r.stdout)
    assert report["phases"][0]["budget"]["kinds"] == ["tokens"]
