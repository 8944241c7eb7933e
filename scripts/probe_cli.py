"""What the probes of scripts/ share: their command line (``--out FILE -- <scaling arguments>``) and running
the ``scaling`` CLI in this process (as ``main.main``: the command returns here, its exit code with it)."""

from __future__ import annotations

import argparse


def probe_args(doc: str) -> tuple[str, list[str]]:
    """``--out`` and the scaling CLI's arguments (after ``--``)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the scaling CLI's arguments")
    args = ap.parse_args()
    return args.out, args.cli[1:] if args.cli[:1] == ["--"] else args.cli


def run_scaling(cli_args: list[str]) -> int:
    """Run the scaling CLI with these arguments; its exit code."""
    from scaling.cli import main

    try:
        main.main(args=cli_args, prog_name="scaling")  # click's standalone mode: ends in SystemExit
        return 0
    except SystemExit as e:
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 1
