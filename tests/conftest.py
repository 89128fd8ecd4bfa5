import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The tests' networks are tiny: one thread is fastest, and on a busy CPU two OpenMP threads spin
# waiting for each other (10-50x slower). Subprocesses (CLI tests) inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


class Compiled(torch.nn.Module):
    """What torch.compile returns, for the tests: a wrapper whose state_dict names start with _orig_mod."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module

    def forward(self, *args):
        return self._orig_mod(*args)


@pytest.fixture
def compiled(monkeypatch):
    """torch.compile replaced by a spy: the list of the modules it was given (each wrapped in Compiled)."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda m: seen.append(m) or Compiled(m))
    return seen
