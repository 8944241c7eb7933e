"""Where the end of a `scaling sweep` goes (a diagnostic for docs/performance.md, ninth round).

Runs ``scaling.cli`` with the given arguments and notes, in epoch seconds: when the sweep's parent run was
finished (``scaling.sweep.finalize_parent`` returned), when the first and the last exit handler ran, and when
each of inductor's compile-worker pools began and ended waiting for its sidecar process at shutdown (an exit
handler of torch's); they go to ``--out`` (JSON) and, as seconds after the parent run's end, to stderr. The
process's own end and its sidecar's are for the caller to note (scripts/device_speed.sh does).

  python scripts/exit_probe.py --out exit.json -- sweep --phase 2_5 --device cuda --tracking-uri sqlite:///x.db --quiet
"""

from __future__ import annotations

import atexit
import json
import sys
import time

from probe_cli import probe_args, run_scaling


def main() -> int:
    out, cli_args = probe_args(__doc__)
    marks: list[tuple[str, float]] = []

    def note(what: str) -> None:
        marks.append((what, time.time()))

    def report() -> None:  # registered first: the last exit handler to run
        note("atexit_last")
        with open(out, "w") as f:
            json.dump(marks, f)
        t0 = next((t for w, t in marks if w == "parent_end"), None)
        if t0 is not None:
            print("exit probe: " + ", ".join(f"{w} +{t - t0:.3f} s" for w, t in marks), file=sys.stderr)

    atexit.register(report)

    import scaling.sweep as sweep
    original = sweep.finalize_parent

    def finalize(*a, **kw):
        out = original(*a, **kw)
        note("parent_end")
        atexit.register(note, "atexit_first")  # registered last: the first to run
        pools = sys.modules.get("torch._inductor.async_compile")
        for pool in list(getattr(pools, "_pool_set", ())):
            proc = getattr(pool, "process", None)  # a SubprocPool's sidecar: shutdown() waits for it
            if proc is None:
                continue
            wait = proc.wait

            def timed(*wa, _wait=wait, **wkw):
                note("pool_wait_start")
                try:
                    return _wait(*wa, **wkw)
                finally:
                    note("pool_wait_end")
            proc.wait = timed
        note(f"pools_{len(getattr(pools, '_pool_set', ()))}")
        return out

    sweep.finalize_parent = finalize
    return run_scaling(cli_args)


if __name__ == "__main__":
    sys.exit(main())
