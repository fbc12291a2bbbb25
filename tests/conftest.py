import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.pop("WANDB_API_KEY", None)
if not torch.cuda.is_available():
    # kernel=triton runs under the Triton interpreter on a CPU; set for the whole session, before any kernel is
    # decorated (test_mhc_triton.py's own setting would come too late on a worker that trained one already).
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_flush_denormal(True)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers share the cores: one thread each, as the subprocess runs get (OMP_NUM_THREADS=1).
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
