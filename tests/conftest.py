import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The tests' networks are tiny: one thread is fastest, and on a busy CPU two OpenMP threads spin
# waiting for each other (10-50x slower). Subprocesses (CLI tests) inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
