"""Shared test setup: import `minirl` from this checkout, and run torch on one CPU thread.

Test tensors are tiny, so extra threads buy nothing; on a small machine that is busy with other work
they cost a lot (measured here on 2 cores under load: 15 s with two threads, 3 s with one).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on CUDA GPUs only; the GPU tier is `python -m pytest -m gpu tests`")
