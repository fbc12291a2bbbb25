"""Checks of the CUDA paths (`pytest -m gpu` on a machine with a GPU; skipped without one): the fused (torch.compile)
and triton mHC stream kernels against the eager reference, bf16 training, and NCCL on 2 GPUs against 1 GPU."""

import pytest
import torch

from stabletrain.config import ModelConfig
from stabletrain.models import Transformer
from tests.helpers import residual_config, train, train_rows, val_rows

pytestmark = pytest.mark.gpu

CUDA = ("trainer.device=cuda", "trainer.eval_interval=0", "logging=none")


@pytest.mark.parametrize("kernel", ["fused", "triton"])
def test_mhc_kernel_matches_eager_on_cuda(kernel):
    """kernel=fused (torch.compile) and kernel=triton (compiled, not interpreted) against the eager reference."""
    out = {}
    for k in ("eager", kernel):
        torch.manual_seed(0)
        residual = residual_config("mhc", kernel=k, init="megatron", phi_std=0.5, gate_init=1.0)
        cfg = ModelConfig(vocab_size=101, d_model=64, n_layers=2, n_heads=4, norm_eps=1e-12, residual=residual)
        model = Transformer(cfg).cuda()
        ids = torch.randint(0, 101, (2, 32), generator=torch.Generator().manual_seed(1)).cuda()
        logits = model(ids)
        logits.float().square().mean().backward()
        out[k] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(out[kernel][0], out["eager"][0], rtol=1e-4, atol=1e-4)
    for name, grad in out["eager"][1].items():
        torch.testing.assert_close(out[kernel][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_trains_on_gpu(tmp_path):
    train(tmp_path / "run", *CUDA, "precision=bf16", "engine=zero1", "trainer.max_steps=30", "trainer.eval_interval=30")
    vals = val_rows(tmp_path / "run")
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] - 0.5


def test_nccl_on_two_gpus_matches_one_gpu(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    common = (*CUDA, "trainer.max_steps=6", "engine=zero2")
    train(tmp_path / "one", *common, "trainer.micro_batch_size=8")
    train(tmp_path / "two", *common, "trainer.micro_batch_size=4", nproc=2)  # the same global batch
    for a, b in zip(train_rows(tmp_path / "one"), train_rows(tmp_path / "two")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
