"""Process-group setup that works alike under `python train.py` (one process, no launcher) and torchrun."""

from __future__ import annotations

import atexit
import datetime
import importlib
import os
import signal
import socket

import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it before DeepSpeed imports, instead of it guessing aloud
import deepspeed  # noqa: E402

RUN_STAMP_ENV = "STABLETRAIN_RUN_STAMP"
# In the order of precedence when ranks disagree. SIGUSR1: SLURM's advance warning (--signal=USR1@<seconds>).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_launched() -> bool:
    """True under torchrun (or any launcher that sets the env:// variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def backend_for(device: torch.device, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def default_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_process_group(backend: str) -> None:
    """Initialise torch.distributed (and DeepSpeed's comm layer on top of it) once per process."""
    if not is_launched():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if backend == "gloo":
        # DeepSpeed JIT-compiles a shared-memory op (35-50 s) used only by inference all-reduce; skip it on CPU.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=30)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent keeps one store across restarts of the group: the keys of the previous attempt
            # would send gloo to ports of dead processes (a hang). Each attempt gets its own key space.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            agent = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
            )
            store = dist.PrefixStore(f"stabletrain/attempt_{attempt}", agent)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
        atexit.register(_destroy_process_group)
    deepspeed.init_distributed(dist_backend=backend)


def _destroy_process_group() -> None:
    # Left to interpreter finalization, gloo's worker threads can still hold tensors whose release needs the GIL:
    # the process then aborts ("terminate called without an active exception") after a successful run.
    if dist.is_initialized():
        dist.destroy_process_group()


def agree_on_run_stamp() -> str:
    """One timestamp for the whole job (Hydra's ${now:} would differ between ranks started in different seconds).

    Rank 0 picks it and broadcasts it; the value lands in STABLETRAIN_RUN_STAMP, which conf/config.yaml uses in
    hydra.run.dir. A stamp already in the environment (e.g. a SLURM job id) wins.
    """
    stamp = os.environ.get(RUN_STAMP_ENV)
    if stamp is None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        if is_launched() and int(os.environ["WORLD_SIZE"]) > 1:
            init_process_group(backend_for(default_device()))
            box = [stamp]
            dist.broadcast_object_list(box, src=0)
            stamp = box[0]
        os.environ[RUN_STAMP_ENV] = stamp
    return stamp


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def setup_device(requested: str = "auto", backend: str = "auto") -> torch.device:
    """This rank's device, ready to train on, and the process group (created once per process)."""
    device = default_device(requested)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals slow CPU steps up to 8x
    else:
        torch.cuda.set_device(device)
    init_process_group(backend_for(device, backend))
    return device


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any rank (collective)."""
    t = torch.tensor(float(flag), device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return bool(t.item())


def gather_rows(local: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's (of `group`: default all) equally shaped rows, concatenated in rank order (collective)."""
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
