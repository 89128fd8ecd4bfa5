"""
The EMA decay of ddgan.py's generator, measured in one training run (not a test): the EMA does not feed back
into training, so one run of the cpu preset keeps several EMAs of the same G side by side, and each is
evaluated as `ddgan.py --eval --n-samples 1000` evaluates the checkpoint's own.

    python bench/ddgan_ema.py                   # the cpu preset; EMAs 0.995, 0.9995, 0.9999 beside 0.999
    python bench/ddgan_ema.py --threads 2 --decays 0.9995
    python bench/ddgan_ema.py --decays --powers 0.5 1 2 4 --seed 2
    python bench/ddgan_ema.py --threads 2 --r1-gamma 0.02 --lazy-reg 15 --max-steps 3200
                        # other flags go to ddgan.py --train: here the cpu preset before r1_church (its R1 and
                        # steps), as in the runs of docs/ddgan.md
    python bench/ddgan_ema.py --ds-lambda 0 ...  # the runs in docs/ddgan.md: all made before the cpu preset
                                                 # took DSGAN's diversity term (ds_lambda 3)

--powers: power-function EMAs (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", its power-function EMA profile): decay (1 - 1/n)^(gamma + 1) at step n = 1, 2, ..., an average over
the whole run so far whose weights grow as a power of the step (gamma 0: all steps alike). common.ema_decay's
warm-up, min(target, (1 + n) / (10 + n)) = 1 - 9 / (10 + n), is about the power EMA with gamma = 8 until it
reaches its target (0.9972 at step 3200), so smaller gammas average over longer stretches of G's wandering.

Writes --out (the run's ckpt.pt, and ema_<decay>/ or power_<gamma>/ckpt.pt: the same checkpoint with that
EMA) and appends one JSON line per EMA to out/ddgan_runs/runs.jsonl. With the preset's thread count the run is
the preset's own (G and D bitwise), so its 0.999 row repeats the preset's FID.
"""
import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import ddgan  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decays", type=float, nargs="*", default=[0.995, 0.9995, 0.9999])
    p.add_argument("--powers", type=float, nargs="*", default=[])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--out", default=os.path.join("out", "ddgan_ema"))
    args, train_flags = p.parse_known_args()
    out = args.out
    flags = ["--preset", args.preset, "--seed", str(args.seed)]
    flags += ["--threads", str(args.threads)] if args.threads else []
    decays = {f"ema_{d:g}": lambda s, d=d: ema_decay(s, d) for d in args.decays}
    decays.update({f"power_{g:g}": lambda s, g=g: (1 - 1 / (s + 1)) ** (g + 1) for g in args.powers})
    extra, step = {}, [0]
    ema_decay, ema_update = common.ema_decay, common.ema_update

    def decay_at(s, target):               # ddgan's step_fn asks for the decay of step s, then updates
        step[0] = s
        return ema_decay(s, target)

    def update(ema, model, decay):
        if not extra:                      # the EMAs start where the preset's does: at G's initial weights
            extra.update({name: copy.deepcopy(ema) for name in decays})
        for name, e in extra.items():
            ema_update(e, model, decays[name](step[0]))
        ema_update(ema, model, decay)

    common.ema_decay, common.ema_update = decay_at, update
    ddgan.main(["--train", "--out", out, *flags, *train_flags])
    common.ema_decay, common.ema_update = ema_decay, ema_update
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    runs = [(f"ema_{ck['config']['ema']:g}", out)]
    for name, e in extra.items():
        folder = os.path.join(out, name)
        os.makedirs(folder, exist_ok=True)
        ema = {k: v.cpu() for k, v in e.state_dict().items()}
        torch.save({**ck, "ema": ema}, os.path.join(folder, "ckpt.pt"))
        runs.append((name, folder))
    tag, from_seed = (f"_seed{args.seed}", f" from --seed {args.seed}") if args.seed else ("", "")
    for name, folder in runs:
        res = ddgan.main(["--eval", "--n-samples", str(args.n_samples), "--out", folder, *flags])
        row = {"run": name + tag,
               "what": f"the {args.preset} preset's G{from_seed} averaged by {name.replace('_', ' ')}", **res}
        with open(os.path.join(os.path.dirname(out), "ddgan_runs", "runs.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row))


if __name__ == "__main__":
    main()
