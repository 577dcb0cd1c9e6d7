import os
import sys

import torch

# Two cores on the CI machine: one intra-op thread per test process keeps timings predictable and
# leaves room for the torchrun tests' two ranks.
torch.set_num_threads(int(os.environ.get("TEST_THREADS", "1")))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
