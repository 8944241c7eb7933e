"""MLproject entry point `sweep`: a phase's whole grid (`scaling sweep`), resumable, N workers."""

from _common import ONLY_EMPTY_UNSET, flag, number, optional, parser, phase_args, run

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--workers", default="1")
    p.add_argument("--devices", default="")
    p.add_argument("--storage", default="")
    p.add_argument("--retry-failed", default="false")
    p.add_argument("--batch-sizes", default="")
    p.add_argument("--lrs", default="")
    p.add_argument("--clips", default="")
    p.add_argument("--compile-mode", default="")
    a = p.parse_args()
    argv = ["sweep", *phase_args(a), "--workers", str(number(a.workers, "workers"))]
    for option, value in (("--storage", a.storage), ("--batch-sizes", a.batch_sizes), ("--lrs", a.lrs),
                          ("--devices", a.devices)):
        optional(argv, option, value)
    optional(argv, "--clips", a.clips, ONLY_EMPTY_UNSET)
    if flag(a.retry_failed):
        argv.append("--retry-failed")
    optional(argv, "--compile-mode", a.compile_mode)
    run(argv)
