"""
Why DDGAN's discriminator falls to chance on the shapes data (docs/ddgan.md; not a test): train ddgan.py's cpu
preset with ddgan.train_step for a few hundred steps and print, every 25 steps, D's loss and its accuracy on
the real and the fake pairs of each t (the fraction of real pairs with D > 0 and of fake pairs with D < 0).

    python bench/ddgan_probe.py                               # the cpu preset (the paper's loss)
    python bench/ddgan_probe.py --set '{"lr_d": 1e-3}'        # preset keys changed (JSON)
    python bench/ddgan_probe.py --freeze-g-at 50              # G stops learning at step 50, D goes on
    python bench/ddgan_probe.py --d-steps 2                   # two D steps for each G step
    python bench/ddgan_probe.py --no-mbstd --zero-head --g-eps 1e-5   # D without minibatch stddev, D's last
                                                              # conv zero-initialised, Adam eps of G
    python bench/ddgan_probe.py --ckpt out/ddgan/ckpt.pt      # a trained checkpoint's D and G, per t:
                                                              # accuracy, mean logits, ||grad_x D|| on real
    python bench/ddgan_probe.py --ckpt CKPT --latent          # how much x_0' = G(x_{t+1}, t, z) moves with
                                                              # z, against with x_{t+1}, per t
    python bench/ddgan_probe.py --heads CKPT [CKPT ...]       # the judge's confidence per head (shape,
                                                              # color, size, position) on their samples
    python bench/ddgan_probe.py --time-steps --threads 2      # seconds per training step: float32,
                                                              # channels-last, bf16, both, batch 16,
                                                              # a lighter G, reused fakes, both
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import ddgan  # noqa: E402

# the probes and step times in docs/ddgan.md were measured on the cpu preset with the paper's loss, before
# it took DSGAN's diversity term (ds_lambda 3): --set '{"ds_lambda": 3}' probes the preset as it is now
PAPER_LOSS = {"ds_lambda": 0.0}


class Recorder(nn.Module):
    """D, keeping the logits of the calls train_step makes for D's update: (real, fake), in that order."""

    def __init__(self, D):
        super().__init__()
        self.D, self.calls = D, []

    def forward(self, x_prev, x_t, t):
        out = self.D(x_prev, x_t, t)
        if torch.is_grad_enabled() and next(self.D.parameters()).requires_grad:
            self.calls.append((out.detach(), t))
        return out


class NoStep(torch.optim.Adam):
    """An optimizer that leaves its network as it is (G frozen, or a D step without a G step)."""

    def step(self, closure=None):
        return None


def load(path, n):
    """A checkpoint's config, its schedule, n held-out shapes, and net(key): its "G", "ema" or "D", in eval
    mode."""
    ck = common.load_checkpoint(path, ["ddgan"])
    cfg = ck["config"]

    def net(key):
        return common.load_state((ddgan.Discriminator if key == "D" else ddgan.Generator)(cfg), ck[key],
                                 path).eval()

    x0 = common.held_out_images("shapes", cfg["image_size"], cfg["channels"], n)
    return cfg, ddgan.schedule_from(cfg, torch.device("cpu")), x0, net


@torch.no_grad()
def probe_checkpoint(path, n=256):
    """D of a trained checkpoint on n held-out real pairs and n pairs made by its G (not the EMA: the G that D
    was trained against), per t: accuracy, mean logits, and the norm of grad_x D at the real pairs (R1's)."""
    cfg, sched, x0, net = load(path, n)
    G, D = net("G"), net("D")
    torch.manual_seed(0)
    for i in range(cfg["timesteps"]):
        t = torch.full((n,), i)
        x_t, x_t1 = sched.q_sample_pairs(x0, t)
        fake = D(sched.sample_posterior(G(x_t1, t, torch.randn(n, cfg["nz"])), x_t1, t), x_t1, t)
        with torch.enable_grad():
            x_t.requires_grad_(True)
            real = D(x_t, x_t1, t)
            grad, = torch.autograd.grad(real.sum(), x_t)
        acc = ((real > 0).float().mean() + (fake < 0).float().mean()) / 2
        print(f"t = {i}: accuracy {acc:.2f}, D(real) {real.mean():+.2f}, D(fake) {fake.mean():+.2f}, "
              f"||grad_x D(real)|| {grad.flatten(1).norm(dim=1).mean():.3f}")


@torch.no_grad()
def probe_latent(path, n=256):
    """How much G's x_0' depends on its latent z, against how much on x_{t+1}, per t, for the EMA and G: the
    mean squared change of x_0' = G(x_{t+1}, t, z) when z is drawn again, and when x_{t+1} is another image's
    (the same z). A G that ignores z is a deterministic x_0 predictor, and each step a Gaussian posterior."""
    cfg, sched, x0, net = load(path, n)
    gens = {key: net(key) for key in ("ema", "G")}
    for key, G in gens.items():
        torch.manual_seed(0)
        for i in range(cfg["timesteps"]):
            t = torch.full((n,), i)
            _, x_t1 = sched.q_sample_pairs(x0, t)
            z = torch.randn(n, cfg["nz"])
            x0_pred = G(x_t1, t, z)
            by_z = (G(x_t1, t, torch.randn(n, cfg["nz"])) - x0_pred).square().mean()
            by_x = (G(x_t1.roll(1, 0), t, z) - x0_pred).square().mean()
            print(f"{key:3s} t = {i}: x_0' moves by {by_z:.5f} with a new z, "
                  f"{by_x:.5f} with another x_{{t+1}}")
    G, D = gens["G"], net("D")
    for i in range(cfg["timesteps"]):   # what D tells G (the G it trains against) at each t, and what
        t = torch.full((32,), i)          # DSGAN's term would (ddgan.diversity): 16 x_{t+1}, two z each
        _, x_t1 = sched.q_sample_pairs(x0[:16], t[:16])
        x_t1, z = x_t1.repeat(2, 1, 1, 1), torch.randn(32, cfg["nz"])
        with torch.enable_grad():
            x0_pred = G(x_t1, t, z)
            loss = ddgan.generator_loss(D(sched.sample_posterior(x0_pred, x_t1, t), x_t1, t))
            norms = [torch.cat([g.flatten() for g in torch.autograd.grad(f, list(G.parameters()),
                                                                        retain_graph=True)]).norm()
                     for f in (loss, ddgan.diversity(x0_pred, z, 0.1))]
        print(f"t = {i}: in G's weights, ||grad of G's GAN loss|| {norms[0]:.3f}, "
              f"of the diversity term {norms[1]:.3f}")


@torch.no_grad()
def probe_heads(paths, n=1000):
    """Which of the judge's heads the samples fail: per head (shape, color, size, position), the fraction of n
    samples of each checkpoint's EMA (seed 0) that the judge puts in one class with p > 0.9, and the shares of
    the classes it predicts, beside the same for n held-out images (--eval's `confident`: all four heads)."""
    judge = common.get_judge("shapes", 32, 3, "cpu")
    rows = [("held-out data", common.held_out_images("shapes", 32, 3, n))]
    for path in paths:
        G, sched, ck = ddgan.load(path, "cpu")
        torch.manual_seed(0)
        shape = (ck["config"]["channels"], ck["config"]["image_size"], ck["config"]["image_size"])
        rows.append((path, ddgan.sample(G, sched, n, shape, "cpu")[0]))
    for name, x in rows:
        probs = {k: v.softmax(1) for k, v in judge(x).items()}
        sure = {k: (p.amax(1) > 0.9).float().mean().item() for k, p in probs.items()}
        print(f"{name}: confident on every head {common.judge_confident(judge, x):.3f}; per head "
              + ", ".join(f"{k} {v:.2f}" for k, v in sure.items()))
        for k, p in probs.items():
            share = torch.bincount(p.argmax(1), minlength=len(judge.classes[k])) / len(x)
            print(f"    {k}: " + ", ".join(f"{c} {s:.2f}" for c, s in zip(judge.classes[k], share.tolist())))


def reused_fake_step(G, D, opt_g, opt_d, sched, x0, cfg, step, amp=None):
    """ddgan.train_step without its second G forward: G's step reuses the D step's fake pairs (made with
    grad) against the updated D, as many GAN codes do; the official code draws new t, noise and z. Timed in
    float32 only: `amp` is there for train_step's signature and must be None."""
    assert amp is None, "reused_fake_step runs in float32 only"
    t = torch.randint(0, sched.T, (x0.shape[0],))
    x_t, x_t1 = sched.q_sample_pairs(x0, t)
    reg = step % cfg["lazy_reg"] == 0
    x_t.requires_grad_(reg)
    x_fake = sched.sample_posterior(G(x_t1, t, torch.randn(len(t), cfg["nz"])), x_t1, t)
    d_real = D(x_t, x_t1, t)
    loss_d = ddgan.discriminator_loss(d_real, D(x_fake.detach(), x_t1, t))
    r1 = ddgan.r1_penalty(d_real, x_t, cfg["r1_gamma"]) if reg else 0.0
    opt_d.zero_grad(set_to_none=True)
    (loss_d + r1).backward()
    opt_d.step()
    D.requires_grad_(False)
    opt_g.zero_grad(set_to_none=True)
    ddgan.generator_loss(D(x_fake, x_t1, t)).backward()
    opt_g.step()
    D.requires_grad_(True)


def time_steps(rounds=5, steps=10):
    """Seconds per training step of the cpu preset, in one process, the settings taking turns each round
    (the machine's load falls on all of them alike): float32, channels-last networks and inputs, bf16
    autocast, both, a batch of 16, a lighter G (no residual up/down blocks, no attention), G's step reusing
    the D step's fakes, both of the last two, G and D at 8 channels on the 32x32 level (`slim`), and that
    with reused fakes. The median over rounds of the mean over `steps` steps."""
    light = {"resblock_updown": False, "attn_res": []}
    # 8 channels at 32x32 in G and D, as wide as the preset below it: forward GFLOP at batch 32, G 4.8 -> 3.7,
    # D 1.5 -> 1.1
    slim = {"ch": 8, "ch_mult": [1, 4, 4], "d_ch": 8, "d_mult": [1, 4, 8, 8]}
    settings = {   # name: (channels-last, bf16, batch, preset keys changed, step)
        "float32": (False, False, 32, {}, ddgan.train_step),
        "channels-last": (True, False, 32, {}, ddgan.train_step),
        "bf16": (False, True, 32, {}, ddgan.train_step),
        "channels-last + bf16": (True, True, 32, {}, ddgan.train_step),
        "batch 16": (False, False, 16, {}, ddgan.train_step),
        "lighter G": (False, False, 32, light, ddgan.train_step),
        "reused fakes": (False, False, 32, {}, reused_fake_step),
        "lighter G + reused": (False, False, 32, light, reused_fake_step),
        "slim 32x32": (False, False, 32, slim, ddgan.train_step),
        "slim 32x32 + reused": (False, False, 32, slim, reused_fake_step)}
    cpu = {**ddgan.PRESETS["cpu"], **PAPER_LOSS}   # reused_fake_step has no diversity term
    sched = ddgan.schedule_from(cpu, torch.device("cpu"))
    x0 = common.held_out_images("shapes", cpu["image_size"], cpu["channels"], 32)
    runs, times = {}, {name: [] for name in settings}
    for name, (cl, bf16, batch, changes, step_fn) in settings.items():
        torch.manual_seed(0)
        cfg = {**cpu, **changes}
        fmt = torch.channels_last if cl else torch.contiguous_format
        G, D = ddgan.Generator(cfg).to(memory_format=fmt), ddgan.Discriminator(cfg).to(memory_format=fmt)
        opts = [torch.optim.Adam(m.parameters(), 1e-4, betas=(0.5, 0.9)) for m in (G, D)]
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else None
        runs[name] = (G, D, *opts, x0[:batch].contiguous(memory_format=fmt), cfg, amp, step_fn)
    for r in range(rounds + 1):   # round 0 warms up
        for name, (G, D, opt_g, opt_d, x, cfg, amp, step_fn) in runs.items():
            t0 = time.perf_counter()
            for step in range(1, steps + 1):   # steps 1..10: one lazy R1 step (step 10) as in training
                step_fn(G, D, opt_g, opt_d, sched, x, cfg, step, amp)
            if r:
                times[name].append((time.perf_counter() - t0) / steps)
    base = sorted(times["float32"])[rounds // 2]
    for name, ts in times.items():
        med = sorted(ts)[rounds // 2]
        print(f"{name:22s} {med:.3f} s a step ({med / base:.2f}x float32's)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", default="{}", help="cpu preset keys to change, as JSON")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--freeze-g-at", type=int, default=None)
    p.add_argument("--d-steps", type=int, default=1)
    p.add_argument("--no-mbstd", action="store_true")
    p.add_argument("--zero-head", action="store_true")
    p.add_argument("--g-eps", type=float, default=1e-8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ckpt", help="probe this trained ddgan.py checkpoint instead of training")
    p.add_argument("--latent", action="store_true", help="with --ckpt: how much G's output depends on z")
    p.add_argument("--time-steps", action="store_true", help="seconds per training step: float32, "
                   "channels-last, bf16, both, batch 16, a lighter G, reused fakes, both of those (use "
                   "--threads 2, as the default command)")
    p.add_argument("--heads", nargs="+", metavar="CKPT", help="the judge's confidence per head on these "
                   "checkpoints' samples")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.time_steps:
        return time_steps()
    if args.heads:
        return probe_heads(args.heads)
    if args.ckpt:
        return probe_latent(args.ckpt) if args.latent else probe_checkpoint(args.ckpt)
    cfg = {**ddgan.PRESETS["cpu"], **PAPER_LOSS, **json.loads(args.set)}
    torch.manual_seed(0)
    sched = ddgan.Schedule(cfg["timesteps"], device="cpu")
    G, D = ddgan.Generator(cfg), ddgan.Discriminator(cfg, mbstd=not args.no_mbstd)
    if args.zero_head:
        common.zero(D.conv_out)
    rec = Recorder(D)
    opt_g = torch.optim.Adam(G.parameters(), cfg["lr"], betas=(0.5, 0.9), eps=args.g_eps)
    opt_d = torch.optim.Adam(D.parameters(), cfg["lr_d"], betas=(0.5, 0.9))
    frozen = NoStep(G.parameters(), cfg["lr"])
    data = common.batches(common.load_data("shapes", 32, 3), cfg["batch_size"], 0)
    T, t0 = cfg["timesteps"], time.time()
    right, seen, loss = torch.zeros(T, 2), torch.zeros(T), 0.0
    for step in range(1, args.steps + 1):
        x0 = next(data)[0]
        for k in range(args.d_steps):
            g_learns = k == args.d_steps - 1 and (args.freeze_g_at is None or step < args.freeze_g_at)
            rec.calls.clear()
            d, _, _ = ddgan.train_step(G, rec, opt_g if g_learns else frozen, opt_d, sched, x0, cfg, step)
        (real, t), (fake, _) = rec.calls[:2]
        for i in range(T):
            m = t == i
            right[i] += torch.stack([(real[m] > 0).sum(), (fake[m] < 0).sum()])
            seen[i] += m.sum()
        loss += d.item()
        if step % 25 == 0:
            acc = right.sum(1) / (2 * seen.clamp(min=1))
            real_acc = right[:, 0] / seen.clamp(min=1)
            acc, real_acc = ([round(a, 2) for a in v.tolist()] for v in (acc, real_acc))
            print(f"step {step}: D loss {loss / 25:.3f}, accuracy per t {acc}, on real pairs {real_acc} "
                  f"({time.time() - t0:.0f} s)", flush=True)
            right.zero_(), seen.zero_()
            loss = 0.0


if __name__ == "__main__":
    main()
