"""kernel=triton (stabletrain/models/residual/mhc_triton.py) against the eager reference: the read and the write with
every gradient, the pending-write fusion across a block boundary, a short training run, the saved activations of
the stream recomputation, and the error without triton. Without a GPU the kernels run under the Triton interpreter
(TRITON_INTERPRET=1, set here: the kernels are decorated on first use, so it need not precede `import stabletrain`);
with one, on CUDA. fp32 throughout: tolerances are rtol 1e-5 with an absolute floor of 1e-6 (one sublayer) or 1e-5
(four sublayers) of the largest entry, the rounding of a different summation order."""

import os
import subprocess

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from torch import nn  # noqa: E402
from torch.autograd.graph import saved_tensors_hooks  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402

from stabletrain.config import ModelConfig  # noqa: E402
from stabletrain.models import Transformer  # noqa: E402
from stabletrain.models.residual import Sublayer  # noqa: E402
from stabletrain.models.residual.manifold import ManifoldConnection, ManifoldStream  # noqa: E402
from stabletrain.models.residual.mhc_triton_autograd import Pending  # noqa: E402
from tests.helpers import PYTHON, REPO, env, residual_config, train, train_rows  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
C, T = 37, 5  # odd sizes: every tile is partly masked


def close(actual, expected, floor=1e-6, msg=""):
    floor *= 10 if CUDA else 1  # the projections run on tensor cores there (tf32x3, about fp32)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=floor * expected.abs().max().item(), msg=msg)


def mhc_cfg(n, kernel):
    # Coefficients far from their init (large alpha and phi, random biases), so every term of the gradient matters.
    return residual_config("mhc", streams=n, kernel=kernel, init="megatron", phi_std=0.5, gate_init=0.7)


def connections(n, kernel, count):
    torch.manual_seed(0)
    conns = [ManifoldConnection(C, n, k, mhc_cfg(n, kernel), None, None).to(DEVICE) for k in range(count)]
    g = torch.Generator().manual_seed(3)
    for c in conns:
        with torch.no_grad():
            c.bias.add_(torch.randn(c.bias.shape, generator=g).to(DEVICE))
    return conns


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def grads(conns, **tensors):
    out = {name: t.grad for name, t in tensors.items()}
    out.update({f"{k}.{name}": p.grad for k, c in enumerate(conns) for name, p in c.named_parameters()})
    return out


def read_write(n, kernel):
    """One sublayer, unfused: h = read(x), x' = write(x, y); a loss on both."""
    (conn,) = connections(n, kernel, 1)
    x, y = randn(T, n, C, seed=1).requires_grad_(), randn(T, C, seed=2).requires_grad_()
    h, (post, res) = conn.read(x)
    out = conn.write(x, y, (post, res))
    ((h * randn(T, C, seed=4)).sum() + (out * randn(T, n, C, seed=5)).sum()).backward()
    return {"h": h, "post": post, "res": res, "out": out}, grads([conn], x=x, y=y)


@pytest.mark.parametrize("n", [4, 3])
def test_read_and_write_and_their_gradients_equal_eager(n):
    (fe, ge), (ft, gt) = read_write(n, "eager"), read_write(n, "triton")
    for name in fe:
        close(ft[name], fe[name], msg=name)
    assert ge.keys() == gt.keys() and {"x", "y", "0.phi", "0.bias", "0.alpha"} <= ge.keys()
    for name in ge:
        close(gt[name], ge[name], msg=name)


def two_blocks(kernel, n=4):
    """Two blocks of two sublayers (tanh of a linear map) on a [1, T, n, C] stream, then the stream written out."""
    conns = connections(n, kernel, 4)
    stream = ManifoldStream(C, mhc_cfg(n, kernel))
    weights = [randn(C, C, seed=10 + k) / C**0.5 for k in range(4)]
    subs = [Sublayer(c, nn.Identity(), lambda h, w=w: torch.tanh(h @ w)) for c, w in zip(conns, weights)]
    x0 = randn(1, T, n, C, seed=1).requires_grad_()
    between = stream.block(x0, subs[:2])
    out = stream.materialize(stream.block(between, subs[2:]))
    (out * randn(*out.shape, seed=2)).sum().backward()
    return between, out, grads(conns, x0=x0)


def test_pending_write_fusion_across_a_block_boundary_equals_eager():
    _, oe, ge = two_blocks("eager")
    between, ot, gt = two_blocks("triton")
    assert isinstance(between, Pending) and between.chain != ()  # the block hands the next one its last write
    close(ot, oe)
    for name in ge:
        close(gt[name], ge[name], floor=1e-5, msg=name)


def test_three_training_steps_equal_eager(tmp_path):
    device = ["trainer.device=cuda"] if CUDA else []
    losses = {}
    for kernel in ("eager", "triton"):
        overrides = ["model=mhc", f"model.residual.kernel={kernel}", "trainer.max_steps=3", *device]
        train(tmp_path / kernel, *overrides, "trainer.eval_interval=0", "logging=none")
        losses[kernel] = [r["loss"] for r in train_rows(tmp_path / kernel)]
    assert len(losses["triton"]) == 3
    assert losses["triton"] == pytest.approx(losses["eager"], abs=1e-4)


class SavedBytes(saved_tensors_hooks):
    """The distinct storages autograd saves, less the model's parameters and buffers (as the planner counts)."""

    def __init__(self, model):
        own = {StorageWeakRef(t.untyped_storage()) for t in (*model.parameters(), *model.buffers())}
        self.bytes: dict = {}

        def pack(t):
            if (ref := StorageWeakRef(t.untyped_storage())) not in own:
                self.bytes[ref] = t.untyped_storage().nbytes()
            return t

        super().__init__(pack, lambda t: t)

    def __enter__(self):
        super().__enter__()
        return self


def saved_per_token(residual, seq=64):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=101, d_model=256, n_layers=2, n_heads=4, residual=residual)).to(DEVICE)
    ids = torch.randint(0, 101, (1, seq), device=DEVICE)
    with SavedBytes(model) as saved:
        model.stream.materialize(model.run_blocks(model.embed_tokens(ids), 0, 2, model.block_context(ids)))
    return sum(saved.bytes.values()) / seq


def test_stream_recomputation_keeps_one_stream_per_block():
    """d_model 256, 2 blocks, n = 4, fp32: triton keeps, per block and token, the block-boundary stream (n C), the
    two sublayer outputs (2 C) and their coefficients (2 (n + n^2)); eager keeps every sublayer's stream."""
    base = saved_per_token(residual_config("standard"))
    eager = saved_per_token(mhc_cfg(4, "eager"))
    ours = saved_per_token(mhc_cfg(4, "triton"))
    assert ours - base == 2 * 4 * (4 * 256 + 2 * 256 + 2 * (4 + 16))
    assert ours <= 1.3 * base and ours < eager  # measured: 45360, 67462, 57968 bytes (1.28x, eager 1.49x)


def test_without_triton_the_error_says_so():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, stabletrain\n"
        "from stabletrain.models.residual.manifold import ManifoldConnection, MHCConfig\n"
        "conn = ManifoldConnection(8, 2, 0, MHCConfig(streams=2, kernel='triton'), None, None)\n"
        "conn.read(torch.randn(3, 2, 8))\n"
    )
    proc = subprocess.run([PYTHON, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "RuntimeError: model.residual.kernel=triton needs the triton package (pip install 'triton>=3.6')"
    )
