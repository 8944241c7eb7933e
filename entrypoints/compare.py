"""MLproject entry point `compare`: fit LR_opt(B) per phase from MLflow and compare phases (`scaling compare`)."""

import argparse

from _common import number, optional, run

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--phases", required=True)
    p.add_argument("--metric", default="final_val_loss")
    p.add_argument("--estimator", default="argmin")
    p.add_argument("--bootstrap", default="1000")
    p.add_argument("--out", default="")
    a = p.parse_args()
    argv = ["compare", "--phases", a.phases, "--metric", a.metric, "--estimator", a.estimator,
            "--bootstrap", str(number(a.bootstrap, "bootstrap"))]
    optional(argv, "--out", a.out)
    run(argv)
