"""FP8 GEMMs in the manner of DeepSeek-V3, applied from outside the model (`precision=fp8`, docs/fp8.md).

Every GEMM is `out[M, N] = a[M, K] @ b[N, K]^T` with both operands quantized to E4M3 along the contracting dimension
K, in blocks of (rows x columns) that share one scale s = amax / 448 (optionally rounded up to a power of two):

    recipe       activation / gradient operand      weight operand
    blockwise    1 x 128  (per row, 128 of K)        128 x 128
    rowwise      1 x K                               1 x K
    tensorwise   the whole tensor                    the whole tensor

A Linear y = x W^T runs three GEMMs:

    forward       y  = x @ W^T      a = x,     b = W,     contracting the input features
    input grad    dx = dy @ W       a = dy,    b = W^T,   contracting the output features
    weight grad   dW = dy^T @ x     a = dy^T,  b = x^T,   contracting the tokens

so in the weight-gradient GEMM the activation is quantized in groups of 128 tokens (128 x 1 on x): no group crosses
the contracting dimension. Products accumulate in fp32: `emulate` dequantizes and multiplies in fp32 (the reference,
runs anywhere); `scaled_mm` runs real E4M3 GEMMs (torch._scaled_mm) over 128-wide chunks of K with per-row scales
and adds the partial products in fp32, the promotion DeepSeek-V3 describes. Operands are zero-padded to whole
blocks (zeros change no amax and add nothing), so any shape runs.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128
MIN_SCALE = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class Block:
    """Rows x columns sharing one scale; None: the whole dimension."""

    rows: int | None
    cols: int | None


RECIPES = {  # (activation and gradient operands, weight operand)
    "blockwise": (Block(1, TILE), Block(TILE, TILE)),
    "rowwise": (Block(1, None), Block(1, None)),
    "tensorwise": (Block(None, None), Block(None, None)),
}


class Stats:
    """What `fp8/*` metrics report, collected only while `active` (every monitor.gain_interval steps)."""

    def __init__(self):
        self.active = False
        self.reset()

    def reset(self) -> None:
        self.counts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # saturated, underflow, total
        self.scale_min, self.scale_max = math.inf, 0.0
        self.gemm_rel_err: dict[str, float] = {}

    def record(
        self,
        kind: str,
        x: torch.Tensor,
        scaled: torch.Tensor,
        q: torch.Tensor,
        scales: torch.Tensor,
        amax: torch.Tensor,
    ) -> None:
        c = self.counts[kind]
        c[0] += float((scaled.abs() > E4M3_MAX * (1 + 1e-6)).sum())  # beyond the rounding of amax / s itself
        c[1] += float(((q.float() == 0) & (x != 0)).sum())
        c[2] += float((x != 0).sum())  # fractions are of the non-zero values (padding is zeros)
        live = scales[amax > 0]  # all-zero tiles keep scale 1 and say nothing
        if live.numel():
            self.scale_min = min(self.scale_min, float(live.min()))
            self.scale_max = max(self.scale_max, float(live.max()))

    def metrics(self) -> dict[str, float]:
        out = {}
        for kind, (sat, under, total) in sorted(self.counts.items()):
            out[f"fp8/saturated/{kind}"], out[f"fp8/underflow/{kind}"] = sat / total, under / total
        if self.counts:
            out["fp8/scale_min"], out["fp8/scale_max"] = self.scale_min, self.scale_max
        out.update({f"fp8/gemm_rel_err/{k}": v for k, v in sorted(self.gemm_rel_err.items())})
        return out


STATS = Stats()


@dataclass
class Quantized:
    """E4M3 values of a [R, K] operand padded to whole blocks, and one fp32 scale per block [R/rows, K/cols]."""

    data: torch.Tensor
    scales: torch.Tensor
    block: tuple[int, int]
    shape: tuple[int, int]

    def row_scales(self, chunk: int) -> torch.Tensor:
        """Per-row scales [R_padded, 1] of the `chunk`-th block column."""
        return self.scales[:, chunk].repeat_interleave(self.block[0]).unsqueeze(1)

    def dequantize(self) -> torch.Tensor:
        r, c = self.block
        s = self.scales.repeat_interleave(r, 0).repeat_interleave(c, 1)
        return (self.data.float() * s)[: self.shape[0], : self.shape[1]]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def quantize(x: torch.Tensor, block: Block, pow2: bool = False, kind: str | None = None) -> Quantized:
    """E4M3 with one scale s = amax / 448 per block of the [R, K] tensor x."""
    R, K = x.shape
    Kp = _round_up(K, 16)  # torch._scaled_mm wants K in multiples of 16
    rows, cols = block.rows or max(R, 1), block.cols or Kp
    Rp, Kp = _round_up(R, rows), _round_up(Kp, cols)
    padded = torch.nn.functional.pad(x.float(), (0, Kp - K, 0, Rp - R))
    tiles = padded.view(Rp // rows, rows, Kp // cols, cols)
    amax = tiles.abs().amax(dim=(1, 3))
    # A scale never below the smallest normal fp32: with denormals flushed (as training on CPU sets them), a tile
    # of tiny values would otherwise get s = 0 and turn into inf and NaN. Such values underflow to 0, as they would.
    scales = torch.where(amax > 0, (amax / E4M3_MAX).clamp_min(MIN_SCALE), torch.ones_like(amax))
    if pow2:
        scales = torch.exp2(torch.ceil(torch.log2(scales)))
    scaled = tiles / scales[:, None, :, None]
    q = scaled.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).view(Rp, Kp)
    if kind is not None and STATS.active:
        STATS.record(kind, padded, scaled, q, scales, amax)
    return Quantized(q, scales, (rows, cols), (R, K))


def gemm(a: Quantized, b: Quantized, backend: str) -> torch.Tensor:
    """a @ b^T in fp32 from two operands quantized along the same contracting dimension."""
    if backend == "emulate":
        return a.dequantize() @ b.dequantize().t()
    cols = min(a.block[1], b.block[1])
    M, N = a.shape[0], b.shape[0]
    out = torch.zeros(a.data.shape[0], b.data.shape[0], dtype=torch.float32, device=a.data.device)
    for k in range(a.data.shape[1] // cols):
        chunk = slice(k * cols, (k + 1) * cols)
        qa, qb = a.data[:, chunk].contiguous(), b.data[:, chunk].contiguous()
        sa, sb = a.row_scales(k * cols // a.block[1]), b.row_scales(k * cols // b.block[1])
        out += torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t().contiguous(), out_dtype=torch.float32)
    return out[:M, :N]


class _FP8Matmul(torch.autograd.Function):
    """y = x @ w^T with the forward, input-gradient and weight-gradient GEMMs in FP8."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, settings: FP8Settings) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.settings = settings
        act, wt = RECIPES[settings.recipe]
        q = lambda t, b: quantize(t, b, settings.pow2, settings.kind)  # noqa: E731
        y = gemm(q(x, act), q(w, wt), settings.backend)
        if STATS.active and settings.kind not in STATS.gemm_rel_err:
            ref = (x.bfloat16() @ w.bfloat16().t()).float()
            STATS.gemm_rel_err[settings.kind] = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        s = ctx.settings
        act, wt = RECIPES[s.recipe]
        q = lambda t, b: quantize(t, b, s.pow2, s.kind)  # noqa: E731
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = gemm(q(dy, act), q(w.t(), wt), s.backend).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = gemm(q(dy.t(), act), q(x.t(), act), s.backend).to(w.dtype)
        return dx, dw, None


@dataclass(frozen=True)
class FP8Settings:
    recipe: str
    backend: str
    pow2: bool
    kind: str  # attn | mlp | expert: the metrics' layer type


class FP8Linear(nn.Linear):
    """An nn.Linear whose GEMMs run in FP8; the same parameters (and state-dict names) as the Linear it was."""

    fp8: FP8Settings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FP8Matmul.apply(x.reshape(-1, x.shape[-1]), self.weight, self.fp8)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_dequantize(x: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """x through E4M3 in 1 x 128 tiles of its last dimension and back (FP8 token dispatch), in x's dtype."""
    flat = x.reshape(-1, x.shape[-1])
    return quantize(flat, RECIPES["blockwise"][0], pow2).dequantize().to(x.dtype).view_as(x)


# ---------------------------------------------------------------- applying it to a model
# What stays in high precision (DeepSeek-V3): embedding, output head, norms, attention itself, MoE gates, and here
# the residual streams' coefficient projections. Only Linears under a block's attention and feed-forward convert.
FP8_PARENTS = ("attn", "mlp")


def fp8_linears(model: nn.Module) -> dict[str, tuple[nn.Linear, str]]:
    """The Linears that run in FP8, by qualified name, with their metrics kind (attn | mlp | expert)."""
    out = {}
    for i, block in enumerate(model.blocks):
        for name, module in block.named_modules():
            parts = name.split(".")
            if type(module) is nn.Linear and parts[0] in FP8_PARENTS and "router" not in parts:
                kind = "expert" if "experts" in parts else parts[0]
                out[f"blocks.{i}.{name}"] = (module, kind)
    return out


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


@dataclass
class FP8Conversion:
    """What apply_fp8 did: block Linears converted (those padded to the backend's tile among them) and left in
    high precision, and the share of the block Linears' weights (their GEMM work) that runs in FP8."""

    converted: list[str] = field(default_factory=list)
    padded: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    converted_params: int = 0
    total_params: int = 0

    @property
    def coverage(self) -> float:
        return self.converted_params / self.total_params if self.total_params else 1.0


def apply_fp8(model: nn.Module, precision) -> FP8Conversion:
    """Convert the blocks' Linears for precision.fp8 (nothing when it is off). Our backends take any shape (the
    quantizer pads to whole tiles); torchao's need multiples of 16 (128 for blockwise), so other widths (a SwiGLU
    of 5461) run padded: zero rows and columns, the result sliced."""
    f, out = precision.fp8, FP8Conversion()
    if not f.enabled:
        return out
    recipe, backend = str(f.recipe), str(f.backend)
    for name, (linear, kind) in fp8_linears(model).items():
        out.total_params += linear.weight.numel()
        if backend != "torchao":
            linear.__class__ = FP8Linear  # same parameters, same state-dict names: checkpoints are unchanged
            linear.fp8 = FP8Settings(recipe, backend, f.pow2_scales, kind)
        elif linear.bias is not None and recipe == "blockwise":
            out.fallbacks.append(name)  # torchao's blockwise Linear has no bias (ours have none)
            continue
        else:
            converted, padded = _torchao_linear(linear, recipe)
            _set_submodule(model, name, converted)
            out.padded += [name] if padded else []
        out.converted.append(name)
        out.converted_params += linear.weight.numel()
    return out


def _round_up_to(n: int, m: int) -> int:
    return -(-n // m) * m


@functools.cache
def _torchao_classes(recipe: str) -> tuple[type, type, int]:
    """(torchao's float8 Linear for `recipe`, the same with its GEMMs on operands zero-padded to the backend's tile,
    the tile: 16, or 128 for blockwise). The padded one keeps the weight parameter's shape and name; the padding is
    rebuilt in every forward (its gradient flows back to the parameter) and the output sliced. Zeros change no amax
    and add nothing to a product."""
    if recipe == "blockwise":
        from torchao.prototype.blockwise_fp8_training.linear import Float8BlockwiseLinear, fp8_blockwise_mm

        base, multiple = Float8BlockwiseLinear, TILE
        gemm = lambda mod, x, w: fp8_blockwise_mm.apply(x, w, mod.block_size, mod.dtype, mod.use_triton)  # noqa: E731
    else:
        from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args

        base, multiple = Float8Linear, 16
        gemm = lambda mod, x, w: matmul_with_hp_or_float8_args.apply(x, w.t(), mod.linear_mm_config, mod.config)  # noqa: E731

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if recipe != "blockwise" and torch.is_autocast_enabled():
            x = x.to(torch.get_autocast_dtype("cuda"))  # as torchao's own forward does under autocast
        o, i = self.out_features, self.in_features
        pad_i, pad_o = _round_up_to(i, multiple) - i, _round_up_to(o, multiple) - o
        w = torch.nn.functional.pad(self.weight, (0, pad_i, 0, pad_o))
        return gemm(self, torch.nn.functional.pad(x, (0, pad_i)), w)[..., :o]

    return base, type(f"Padded{base.__name__}", (base,), {"forward": forward}), multiple


def _torchao_linear(linear: nn.Linear, recipe: str) -> tuple[nn.Module, bool]:
    """torchao's float8 training Linear for this one (padded when its shape is not a whole number of the backend's
    tiles), and whether it is padded."""
    from torchao.float8 import Float8LinearConfig

    base, padded_cls, multiple = _torchao_classes(recipe)
    padded = linear.in_features % multiple != 0 or linear.out_features % multiple != 0
    cls = padded_cls if padded else base
    if recipe != "blockwise":
        return cls.from_float(linear, config=Float8LinearConfig.from_recipe_name(recipe)), padded
    with torch.device("meta"):  # torchao's from_float refuses widths that are not multiples of 128
        new = cls(linear.in_features, linear.out_features, bias=False)
    new.weight = linear.weight
    return new, padded
