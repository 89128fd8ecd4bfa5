"""The timing benchmark of the papers' efficiency claims runs and reports what it says it measures."""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import compare  # noqa: E402


def test_compare_tiny():
    args = argparse.Namespace(preset="tiny", batch=4, n=2, iters=1)
    rows = compare.compare_ldm(args)
    pixel, latent = rows
    assert pixel["input"] == "3x16x16" and latent["input"] == "4x4x4"  # tiny: 16 px, f = 4, 4 latent channels
    assert all(v > 0 for r in rows for k, v in r.items() if k.endswith("_s") or "per_image" in k)
    rows = compare.compare_ddgan(args)
    # DDGAN T = 4 and 1, DDIM 4 and 50, DDPM all 100 (tiny)
    assert [r["nfe"] for r in rows] == [4, 1, 4, 50, 100]
    assert all(r["s_per_image"] > 0 for r in rows)
