"""MLproject entry point `search`: boundary-aware Optuna LR search per batch size (`scaling search`)."""

from _common import number, optional, parser, phase_args, run

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--batch-sizes", required=True)
    p.add_argument("--trials", default="12")
    p.add_argument("--sampler", default="tpe")
    p.add_argument("--pruner", default="none")
    p.add_argument("--storage", default="")
    p.add_argument("--study-name", default="")
    p.add_argument("--extend-factor", default="3")
    p.add_argument("--max-extensions", default="4")
    p.add_argument("--batch", default="4")
    p.add_argument("--compile-mode", default="")
    a = p.parse_args()
    argv = ["search", *phase_args(a), "--batch-sizes", a.batch_sizes, "--trials", str(number(a.trials, "trials")),
            "--sampler", a.sampler, "--pruner", a.pruner,
            "--extend-factor", str(number(a.extend_factor, "extend_factor", float)),
            "--max-extensions", str(number(a.max_extensions, "max_extensions")),
            "--batch", str(number(a.batch, "batch"))]
    optional(argv, "--storage", a.storage)
    optional(argv, "--study-name", a.study_name)
    optional(argv, "--compile-mode", a.compile_mode)
    run(argv)
