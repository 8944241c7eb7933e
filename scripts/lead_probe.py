"""How far the host runs ahead of the GPU inside a real `scaling sweep` (a diagnostic for docs/performance.md).

Runs ``scaling.cli`` with the given arguments, with ``scaling.batched.train_group`` wrapped so that the first
config's ``on_step`` hook also records a CUDA event after every tick; every 10 ticks it notes the lead (ticks
issued by the host that the GPU has not finished) and the host's time. At the end it writes them to ``--out``
(JSON) and prints a summary: a lead near 0 means the host's own work sets the pace (anything that holds the
GIL or the loop slows the steps), a lead of many ticks means the GPU does (the host's work is hidden).

  python scripts/lead_probe.py --out lead.json -- sweep --phase 2_5 --device cuda --tracking-uri sqlite:///x.db --quiet
"""

from __future__ import annotations

import bisect
import json
import statistics
import sys
import time

from probe_cli import probe_args, run_scaling


def main() -> int:
    out, cli_args = probe_args(__doc__)

    import torch

    import scaling.batched as batched
    samples: list[tuple[int, int, float]] = []  # (tick, lead in ticks, host seconds)
    events: list = []
    original = batched.train_group

    def probed(cfgs, corpus, device, hooks=None, *a, **kw):
        hooks = list(hooks) if hooks is not None else [batched.Hooks() for _ in cfgs]
        first = hooks[0]
        t0 = time.perf_counter()

        def on_step(step):
            first.on_step(step)
            ev = torch.cuda.Event()
            ev.record()
            events.append(ev)
            if step % 10 == 0:
                # events complete in stream order: the first incomplete one by bisection
                lo = bisect.bisect_left(range(len(events)), True, key=lambda i: not events[i].query())
                samples.append((step, len(events) - lo, time.perf_counter() - t0))

        hooks[0] = batched.Hooks(on_log=first.on_log, on_eval=first.on_eval, on_checkpoint=first.on_checkpoint,
                                 on_step=on_step)
        return original(cfgs, corpus, device, hooks, *a, **kw)

    batched.train_group = probed

    def report():
        leads = [lead for _, lead, _ in samples]
        if not leads:
            print("lead probe: no samples", file=sys.stderr)
            return
        with open(out, "w") as f:
            json.dump({"samples": samples}, f)
        q = statistics.quantiles(leads, n=20)
        print(f"lead probe: {len(leads)} samples; lead in ticks: median {statistics.median(leads)}, 5% {q[0]}, "
              f"95% {q[-1]}, min {min(leads)}, max {max(leads)}; at most 1 tick ahead in "
              f"{sum(x <= 1 for x in leads) / len(leads):.1%}", file=sys.stderr)

    code = run_scaling(cli_args)
    report()
    return code


if __name__ == "__main__":
    sys.exit(main())
