"""Which device each sweep worker trains on: ``--devices cuda:0,cuda:1`` or every visible GPU, round-robin.

Pure functions (tested on CPU, where ``--devices cpu,cpu`` exercises the same assignment): a list of
device strings is checked once at the edge, then worker ``i`` gets ``devices[i % len(devices)]``.
"""

from __future__ import annotations

import re

from scaling.config import ConfigError

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_devices(text: str | None, n_gpus: int | None = None) -> list[str] | None:
    """``"cuda:0,cuda:1"`` → ``["cuda:0", "cuda:1"]`` (None stays None); each must be ``cpu``, ``cuda``
    or ``cuda:N`` with a visible GPU N (ConfigError otherwise). ``cuda`` means ``cuda:0``."""
    if text is None:
        return None
    items = [x.strip().lower() for x in text.split(",") if x.strip()]
    if not items:
        raise ConfigError("--devices must list devices, e.g. cuda:0,cuda:1 or cpu,cpu")
    n_gpus = gpu_count() if n_gpus is None else n_gpus
    out = []
    for item in items:
        if not _DEVICE_RE.match(item):
            raise ConfigError(f"--devices: {item!r} is not a device (cpu, cuda or cuda:N)")
        if item.startswith("cuda"):
            index = int(item.partition(":")[2] or 0)
            if index >= n_gpus:
                seen = f"{n_gpus} visible GPU(s)" + (f": cuda:0..cuda:{n_gpus - 1}" if n_gpus else "")
                raise ConfigError(f"--devices: {item} is not visible on this machine ({seen})")
            item = f"cuda:{index}"
        out.append(item)
    return out


def default_devices(device: str, n_gpus: int | None = None) -> list[str]:
    """Without ``--devices``: every visible GPU when ``device`` is auto/cuda and there is one, else ``device``."""
    n_gpus = gpu_count() if n_gpus is None else n_gpus
    if device in ("auto", "cuda") and n_gpus:
        return [f"cuda:{i}" for i in range(n_gpus)]
    return ["cpu" if device == "auto" else device]


def worker_devices(n_workers: int, devices: list[str]) -> list[str]:
    """The device of each of ``n_workers`` workers: ``devices`` round-robin."""
    if not devices:
        raise ConfigError("no device to assign workers to")
    return [devices[i % len(devices)] for i in range(n_workers)]


__all__ = ["parse_devices", "default_devices", "worker_devices", "gpu_count"]
