"""MLproject entry point `main`: train one configuration (`scaling train`)."""

from _common import ONLY_EMPTY_UNSET, number, optional, parser, phase_args, run

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--batch-size", required=True)
    p.add_argument("--lr", required=True)
    p.add_argument("--clip", default="")
    p.add_argument("--seed", default="-1")
    p.add_argument("--resume", default="")
    a = p.parse_args()
    argv = ["train", *phase_args(a), "--batch-size", str(number(a.batch_size, "batch_size")),
            "--lr", str(number(a.lr, "lr", float))]
    optional(argv, "--clip", a.clip, ONLY_EMPTY_UNSET)
    seed = number(a.seed, "seed")
    if seed >= 0:
        argv += ["--seed", str(seed)]
    optional(argv, "--resume", a.resume)
    run(argv)
