"""Each sweep worker on its own device (scaling.devices), tested on CPU."""

from __future__ import annotations

import pytest
import torch

from scaling.config import ConfigError
from scaling.devices import default_devices, parse_devices, worker_devices
from scaling.runner import device_label


def test_devices_are_parsed_and_checked_against_the_visible_gpus():
    assert parse_devices(None) is None
    assert parse_devices("cuda:0, cuda:1,cuda", n_gpus=2) == ["cuda:0", "cuda:1", "cuda:0"]
    assert parse_devices("cpu,cpu", n_gpus=0) == ["cpu", "cpu"]
    for bad, why in [("cuda:2", "not visible on this machine (2 visible GPU(s): cuda:0..cuda:1)"),
                     ("gpu0", "is not a device"), ("cuda:-1", "is not a device"), (",", "must list devices")]:
        with pytest.raises(ConfigError, match=r".*" + why.replace("(", r"\(").replace(")", r"\)")):
            parse_devices(bad, n_gpus=2)
    with pytest.raises(ConfigError, match=r"0 visible GPU\(s\)\)"):
        parse_devices("cuda:0", n_gpus=0)


def test_workers_go_round_robin_over_the_devices():
    assert worker_devices(5, ["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices(2, ["cpu", "cpu"]) == ["cpu", "cpu"]
    assert default_devices("auto", n_gpus=4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert default_devices("cuda", n_gpus=2) == ["cuda:0", "cuda:1"]
    assert default_devices("auto", n_gpus=0) == ["cpu"] and default_devices("cpu", n_gpus=8) == ["cpu"]


def test_a_sweep_hands_each_worker_process_its_device(tmp_path, tiny_random_phase, monkeypatch):
    """run_sweep gives the worker processes --devices round-robin (default: every visible GPU); the
    processes themselves are replaced by a recorder here (test_sweep starts real ones)."""
    from scaling import sweep
    from scaling.config import load_phase

    handed = []
    monkeypatch.setattr(sweep, "_run_workers", lambda ctx, devices, *a: handed.append(devices))
    phase = load_phase(phase_file=tiny_random_phase)
    kw = dict(tracking_uri=f"sqlite:///{tmp_path / 'm' / 'mlflow.db'}", progress=False, device="cpu")
    sweep.run_sweep(phase, workers=3, devices=["cpu", "cpu"], **kw)
    sweep.run_sweep(phase, workers=2, **kw)
    monkeypatch.setattr(sweep, "default_devices", lambda device: ["cuda:0", "cuda:1", "cuda:2"])
    sweep.run_sweep(phase, workers=4, **kw)
    assert handed == [["cpu", "cpu", "cpu"], ["cpu", "cpu"], ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]]


def test_a_run_records_its_full_device_string():
    assert device_label(torch.device("cpu")) == "cpu"
    if torch.cuda.is_available():
        assert device_label(torch.device("cuda")) == f"cuda:{torch.cuda.current_device()}"
        assert device_label(torch.device("cuda:0")) == "cuda:0"


def test_on_cuda_the_default_group_shares_the_grid_among_the_workers_within_memory():
    from scaling.config import load_phase
    from scaling.sweep import MAX_GROUP_SEQUENCES, default_group_size, plan

    grid = plan(load_phase("2_5"))  # 20 configs, 2,400 sequences in all
    assert default_group_size(grid, 1, on_cuda=True) == 20  # one worker: the whole grid in one pass
    assert default_group_size(grid, 2, on_cuda=True) == 10 and default_group_size(grid, 3, on_cuda=True) == 7
    assert default_group_size(grid, 4, on_cuda=False) == 1
    big = plan(load_phase("4"))  # 168 configs, 48,768 sequences: the whole grid would not fit one GPU
    size = default_group_size(big, 1, on_cuda=True)
    chunks = [big[i:i + size] for i in range(0, len(big), size)]
    assert 1 < size < len(big) and max(sum(c.batch_size for c in ch) for ch in chunks) <= MAX_GROUP_SEQUENCES


def test_a_resumed_grid_is_claimed_in_groups_that_fit_memory(stores):
    """The default group size is checked on the whole grid; what is left of it after a partial sweep (here
    phase 4 with B 16-64 done) is claimed in other chunks, and each claim still stays within the cap."""
    from scaling import tracking
    from scaling.config import load_phase
    from scaling.sweep import ClaimStore, SweepContext, claim_work, default_group_size, group_sequence_cap, plan

    uri, storage = stores
    phase = load_phase("4")
    grid = plan(phase)
    left = [c for c in grid if c.batch_size >= 128]  # 96 configs, 46,080 sequences
    size = default_group_size(grid, 1, on_cuda=True)
    client = tracking.connect(uri)
    ctx = SweepContext(phase=phase, cfgs=grid, splits=("train", "valid"), device="cpu", data_dir=None,
                       tracking_uri=uri, storage=storage, sweep_id="s", parent_run_id="p",
                       exp_id=client.create_experiment("e"), retry_failed=False, session_start_ms=0)
    store = ClaimStore(storage)
    groups = []
    while left:
        items, _ = claim_work(store, client, ctx, left, "me", size)
        groups.append([i.cfg for i in items])
        left = [c for c in left if c not in groups[-1]]
    store.dispose()
    assert sum(c.batch_size for c in grid if c.batch_size >= 128) > group_sequence_cap(grid)
    assert len(groups) == 2 and {c.batch_size for c in groups[1]} == {1024}  # as few groups as fit
    assert all(sum(c.batch_size for c in g) <= group_sequence_cap(grid) for g in groups)
