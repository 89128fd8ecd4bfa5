"""Run by test_cli.py under torchrun: train ddpm.py a few steps, then save this rank's weights."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import common  # noqa: E402
import ddpm  # noqa: E402

out, ranks = sys.argv[1], sys.argv[2]
args = common.make_parser("ddpm", "", ddpm.PRESETS).parse_args(
    ["--train", "--preset", "tiny", "--max-steps", "4", "--batch-size", "4", "--out", out, "--device", "cpu"])
cfg = common.make_config(args, ddpm.PRESETS)
diff = ddpm.diffusion_from(cfg, "cpu")
model_box = {}
rank = int(os.environ["RANK"])
os.makedirs(ranks, exist_ok=True)
_save = common.save_checkpoint


def logged_save(obj, path):  # record which rank writes checkpoints
    open(os.path.join(ranks, f"wrote{rank}"), "a").write(path + "\n")
    _save(obj, path)


common.save_checkpoint = logged_save


def build(c):
    model_box["m"] = common.build_unet(c)
    return model_box["m"]


common.train("ddpm", args, cfg, build, lambda c, dev: (lambda net, x, y, caps: diff.loss(net, x), None),
             final_grid=False)
torch.save(model_box["m"].state_dict(), os.path.join(ranks, f"rank{rank}.pt"))
torch.distributed.destroy_process_group()
