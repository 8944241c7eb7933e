"""Shared by the MLproject entry points: turn MLflow's typed parameters into `scaling` CLI arguments.

Each entry point is a thin wrapper: it builds the same argument list a user would type and runs the
`scaling` command line in-process (one line + exit code 2 on bad input, as the CLI does). Empty strings
and zeros mean "not given" (MLproject parameters cannot be absent). Data options come from the
environment, as for the CLI: SCALING_DATA_DIR, SCALING_SPLITS; the tracking store from
MLFLOW_TRACKING_URI, which `mlflow run` sets to its own store.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python entrypoints/x.py` puts entrypoints/, not the project, on sys.path
    sys.path.insert(0, str(ROOT))

UNSET = ("", "none", "None", "null")
ONLY_EMPTY_UNSET = ("",)  # for --clip/--clips, where "none" is a value: no clipping


class OneLineParser(argparse.ArgumentParser):
    """argparse's usage errors as the CLI gives them: one line, exit code 2 (argparse prints the usage too)."""

    def error(self, message):
        print(f"error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def parser(description: str) -> argparse.ArgumentParser:
    p = OneLineParser(description=description)
    p.add_argument("--phase", default="")
    p.add_argument("--phase-file", default="")
    p.add_argument("--steps", default="0")
    p.add_argument("--device", default="auto")
    return p


def number(value: str, name: str, kind=int):
    try:
        x = float(value)
        return kind(x) if kind is float or x == int(x) else _bad(name, value)
    except (TypeError, ValueError, OverflowError):
        return _bad(name, value)


def _bad(name, value):
    print(f"error: parameter {name} must be a number, got {value!r}", file=sys.stderr)
    sys.exit(2)


def phase_args(a: argparse.Namespace) -> list[str]:
    """--phase/--phase-file (a phase file wins), --steps (0: the phase's budget), --device."""
    out = ["--phase-file", a.phase_file] if a.phase_file not in UNSET else ["--phase", a.phase]
    steps = number(a.steps, "steps")
    if steps:
        out += ["--steps", str(steps)]
    return out + ["--device", a.device]


def flag(value: str) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def optional(argv: list[str], option: str, value, unset=UNSET) -> None:
    """Append ``option value`` unless the value means "not given" (``unset``)."""
    if value is not None and str(value) not in unset:
        argv += [option, str(value)]


def run(argv: list[str]) -> None:
    from scaling.cli import main

    print("scaling " + " ".join(argv), file=sys.stderr)
    main.main(args=argv, prog_name="scaling")
