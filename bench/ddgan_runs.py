"""
The training runs behind docs/ddgan.md (not a test): each run is ddgan.py's cpu preset with a few keys
changed, trained and evaluated exactly as the command line does, so every figure there has a command.

    python bench/ddgan_runs.py --list                  # the runs and what each changes
    python bench/ddgan_runs.py RUN [RUN ...]           # train, then --eval --n-samples 1000, for each RUN
    python bench/ddgan_runs.py RUN --threads 1         # two runs side by side on a 2-core machine

Each run writes out/ddgan_runs/<RUN>/ (ckpt.pt, samples.png, eval_samples.png) and appends one JSON line
(the changes, the training wall and CPU seconds, the eval result) to out/ddgan_runs/runs.jsonl.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ddgan  # noqa: E402

OLD_LR = {"lr": 2e-4, "lr_d": 1.6e-4}               # the cpu preset's learning rates before 'fast_d'
WIDE = {"ch": 32, "d_ch": 32, "max_steps": 1200, **OLD_LR}   # the cpu preset before the 'small' run
RUNS = {  # name: (what it changes, preset keys); the cpu preset's own values are in ddgan.PRESETS["cpu"]
    "preset": ("the cpu preset as it is", {}),
    "T1": ("the same networks and steps as a one-step GAN", {"timesteps": 1}),
    "wide": ("G and D at 32 base channels, 1200 steps (the earlier cpu preset)", WIDE),
    "small": ("G and D at 16 base channels, 2400 steps", {"ch": 16, "d_ch": 16, "max_steps": 2400, **OLD_LR}),
    "ttur": ("wide, with the two time-scale rule: D learns 4x faster than G", {**WIDE, "lr": 1e-4,
                                                                                "lr_d": 4e-4}),
    "r1": ("wide, with R1 weight 1 instead of 0.02", {**WIDE, "r1_gamma": 1.0}),
    "ttur_T1": ("the ttur run as a one-step GAN", {**WIDE, "lr": 1e-4, "lr_d": 4e-4, "timesteps": 1}),
    "fast_d": ("D learns 10x faster than G: lr 1e-4, lr_d 1e-3", {"lr": 1e-4, "lr_d": 1e-3}),
    "fast_d_T1": ("the fast_d run as a one-step GAN", {"lr": 1e-4, "lr_d": 1e-3, "timesteps": 1}),
    "fast_d2": ("D learns 20x faster than G: lr 1e-4, lr_d 2e-3", {"lr": 1e-4, "lr_d": 2e-3}),
    "fast_d_wide_d": ("fast_d with D at 32 base channels", {"lr": 1e-4, "lr_d": 1e-3, "d_ch": 32}),
    "cosine": ("the cpu preset with a per-step cosine decay of both rates to 1e-5", {"cosine": True}),
    "slow_g": ("G learns 20x slower than D: lr 5e-5, lr_d 1e-3", {"lr": 5e-5}),
}


def run(name, threads):
    what, changes = RUNS[name]
    out = os.path.join("out", "ddgan_runs", name)
    ddgan.PRESETS["cpu"] = {**ddgan.PRESETS["cpu"], **changes}
    flags = ["--out", out] + (["--threads", str(threads)] if threads else [])
    t0, c0 = time.time(), time.process_time()
    ddgan.main(["--train", *flags])
    wall, cpu = time.time() - t0, time.process_time() - c0
    res = ddgan.main(["--eval", "--n-samples", "1000", *flags])
    row = {"run": name, "what": what, "changes": changes, "train_wall_s": round(wall, 1),
           "train_cpu_s": round(cpu, 1), "threads": threads, **res}
    with open(os.path.join("out", "ddgan_runs", "runs.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", metavar="RUN")
    p.add_argument("--list", action="store_true")
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        p.error(f"unknown run {unknown[0]}; --list shows them")
    if args.list or not args.runs:
        for name, (what, changes) in RUNS.items():
            print(f"{name:16s} {what}: {changes}")
    for name in args.runs:
        run(name, args.threads)


if __name__ == "__main__":
    main()
