"""The engine: DeepSpeed (initialisation, the step, checkpoints, safe loading) and expert parallelism."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it before DeepSpeed imports, instead of it warning that it guessed
