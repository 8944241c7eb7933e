"""A run's checkpoints in its MLflow artifacts: written atomically, recorded with a checksum, verified on resume.

Each checkpoint is a file of its own, ``checkpoints/step-<step>-<sha256 prefix>.pt``. Saving is three steps:

1. the state is ``torch.save``d to a local temp file and its SHA-256 and size are taken;
2. the file is put into the artifact store: on a local artifact store (``file:`` URIs, the default beside a
   SQLite store) under a temp name in the destination directory, then renamed into place (``os.replace``);
   elsewhere (a tracking server's proxied artifacts, object stores, which have no rename) uploaded under its
   final name, which no record names yet;
3. only then the run's tag ``scaling.checkpoints`` (JSON: step, file, sha256, bytes of the newest
   :data:`KEEP` checkpoints, oldest first) is set to include it, and older files are deleted.

A process killed at any point leaves the previous record intact, naming complete files. On resume the
newest recorded checkpoint is downloaded and its checksum and size checked; a damaged one (truncated,
corrupted, missing) is said on stderr and the previous good one is used, or step 0 if none is good.
Runs written before records existed have only ``checkpoints/last.pt``: it is loaded as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from scaling import tracking
from scaling.config import error_line, first_line

CHECKPOINT_DIR = "checkpoints"
LEGACY_CHECKPOINT = "checkpoints/last.pt"
TAG_CHECKPOINTS = "scaling.checkpoints"
KEEP = 2  # the newest and the one before it: a damaged newest one falls back to its predecessor


@dataclass(frozen=True)
class CheckpointRecord:
    step: int
    file: str  # artifact path
    sha256: str
    bytes: int


@dataclass
class LoadedCheckpoint:
    state: dict
    record: CheckpointRecord | None  # None: a run's legacy last.pt


def recorded(client, run_id: str) -> list[CheckpointRecord]:
    """The run's checkpoint records, oldest first (none for a run without any, or with an unreadable tag)."""
    raw = client.get_run(run_id).data.tags.get(TAG_CHECKPOINTS)
    try:
        return [CheckpointRecord(int(r["step"]), str(r["file"]), str(r["sha256"]), int(r["bytes"]))
                for r in json.loads(raw)] if raw else []
    except (ValueError, KeyError, TypeError):
        return []


def file_digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest(), path.stat().st_size


def local_artifact_dir(client, run_id: str) -> Path | None:
    """The run's artifact directory when its artifact store is this machine's file system."""
    uri = client.get_run(run_id).info.artifact_uri or ""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        from mlflow.utils.file_utils import local_file_uri_to_path

        return Path(local_file_uri_to_path(uri))
    return Path(uri) if parsed.scheme == "" and uri else None


def copy_into_place(src: Path, dest: Path) -> None:
    """``dest`` appears complete or not at all: copied under a temp name beside it, synced, renamed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(client, run_id: str, state: dict,
                    records: list[CheckpointRecord] | None = None) -> list[CheckpointRecord]:
    """Write ``state`` as the run's newest checkpoint (module docstring); the run's records after it.
    ``records``: the run's records as the caller last left them (read from the run when None)."""
    records = recorded(client, run_id) if records is None else records
    local_dir = local_artifact_dir(client, run_id)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d) / "state.pt"
        torch.save(state, tmp)
        sha, size = file_digest(tmp)
        name = f"step-{int(state['step']):08d}-{sha[:12]}.pt"
        rec = CheckpointRecord(int(state["step"]), f"{CHECKPOINT_DIR}/{name}", sha, size)
        if local_dir is not None:
            copy_into_place(tmp, local_dir / rec.file)
        else:
            final = Path(d) / name
            tmp.rename(final)
            client.log_artifact(run_id, str(final), CHECKPOINT_DIR)
    # A resumed run trains its steps after the checkpoint again: records of those steps are superseded.
    kept = [r for r in records if r.step < rec.step][-(KEEP - 1):] + [rec]
    tracking.set_tags(client, run_id, {TAG_CHECKPOINTS: json.dumps([asdict(r) for r in kept])})
    _remove_unrecorded(client, run_id, local_dir, {r.file for r in kept})
    return kept


def _remove_unrecorded(client, run_id: str, local_dir: Path | None, keep: set[str]) -> None:
    """Delete checkpoint files no record names (superseded ones, or uploads a kill cut short). Best
    effort: an artifact store that cannot delete keeps them, and they are never read."""
    try:
        if local_dir is not None:
            for p in (local_dir / CHECKPOINT_DIR).iterdir():
                if f"{CHECKPOINT_DIR}/{p.name}" not in keep and p.name != Path(LEGACY_CHECKPOINT).name:
                    p.unlink(missing_ok=True)
            return
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        repo = get_artifact_repository(client.get_run(run_id).info.artifact_uri)
        for f in client.list_artifacts(run_id, CHECKPOINT_DIR):
            if f.path not in keep and f.path != LEGACY_CHECKPOINT:
                repo.delete_artifacts(f.path)
    except tracking.StoreUnavailable:
        raise
    except Exception as e:
        print(f"warning: run {run_id}: old checkpoints not removed ({first_line(e, 120)})", file=sys.stderr)


def _read(client, run_id: str, rec: CheckpointRecord, d: str) -> dict:
    """The state of one recorded checkpoint; ValueError saying what is wrong with it."""
    try:
        path = Path(client.download_artifacts(run_id, rec.file, d))
    except tracking.StoreUnavailable:
        raise
    except Exception as e:
        raise ValueError(f"cannot be downloaded ({first_line(e, 100)})") from None
    sha, size = file_digest(path)
    if size != rec.bytes:
        raise ValueError(f"{size} bytes, {rec.bytes} recorded: truncated")
    if sha != rec.sha256:
        raise ValueError("its checksum differs from the one recorded at save: corrupted")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("step") != rec.step:
        raise ValueError("not a checkpoint of this step")
    return state


def load_checkpoint(client, run_id: str) -> dict | None:
    """The newest good checkpoint state of the run, or None (train from step 0). Damaged ones are said."""
    found = load_verified(client, run_id)
    return found.state if found else None


def load_verified(client, run_id: str) -> LoadedCheckpoint | None:
    records = recorded(client, run_id)
    if not records:
        state = _load_legacy(client, run_id)
        return LoadedCheckpoint(state, None) if state is not None else None
    damaged: list[str] = []
    with tempfile.TemporaryDirectory() as d:
        for rec in reversed(records):
            try:
                state = _read(client, run_id, rec, d)
            except tracking.StoreUnavailable:
                raise
            except Exception as e:
                damaged.append(f"step {rec.step}: {first_line(e, 160)}")
                continue
            if damaged:
                print(f"run {run_id}: damaged checkpoint ({'; '.join(damaged)}); resuming from the previous "
                      f"good one, step {rec.step}", file=sys.stderr)
            return LoadedCheckpoint(state, rec)
    print(f"run {run_id}: no good checkpoint ({'; '.join(damaged)}); training it again from step 0",
          file=sys.stderr)
    return None


def _load_legacy(client, run_id: str) -> dict | None:
    """``checkpoints/last.pt`` of a run written without records; unreadable: None (from step 0), said."""
    try:
        names = [f.path for f in client.list_artifacts(run_id, CHECKPOINT_DIR)]
    except Exception:
        return None
    if LEGACY_CHECKPOINT not in names:
        return None
    with tempfile.TemporaryDirectory() as d:
        path = client.download_artifacts(run_id, LEGACY_CHECKPOINT, d)
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            print(f"run {run_id}: its checkpoint cannot be read ({error_line(e, 120)}); "
                  "training it again from step 0", file=sys.stderr)
            return None
    return state if isinstance(state, dict) and "step" in state else None


__all__ = ["CheckpointRecord", "LoadedCheckpoint", "TAG_CHECKPOINTS", "KEEP", "recorded", "save_checkpoint",
           "load_checkpoint", "load_verified", "copy_into_place"]
