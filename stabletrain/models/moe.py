"""Mixture-of-Experts feed-forward: fine-grained routed experts plus shared experts (DeepSeekMoE), and the
routers that choose the experts, each registered with its own config (model/ffn/router=<name>):

- none:        softmax top-K, gates renormalised over the selected experts, no balancing
- softmax_aux: the same plus the Switch/GShard load-balancing loss  coef * E * sum_i f_i P_i
- aux_free:    sigmoid affinities; a per-expert bias (a buffer, no gradient) only for selection; selected gates
               renormalised then * route_scale; after each optimizer step the bias moves against the global-batch
               load (`after_step`), b_i += u * sign(mean load - load_i)
- bslo:        capacity-aware gating softmax(w x / tau) * min(1, C / N_i), top-K after scaling (experimental)

Every router counts how many tokens it sent to each expert (`load`), in training and in evaluation, for the
balance metrics (`maxvio`) and the bias update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stabletrain.config import ConfigError, FFNConfig
from stabletrain.config.fields import Choice, at_least, positive
from stabletrain.models.feedforward import FEED_FORWARDS
from stabletrain.models.init import reset_own_parameters
from stabletrain.models.layers import SwiGLU
from stabletrain.registry import Registry

ROUTERS = Registry("router", group="model/ffn/router")


class SeqAuxIndicator(Choice):
    unbiased = "unbiased"  # DeepSeek-V3's definition: the top-k of the raw affinities
    biased = "biased"  # the selection actually made (affinities + balancing bias)


@dataclass
class RouterConfig:
    """What every router has; `none` is this config itself."""

    kind: str = "none"  # the registered name: set by model/ffn/router=<name>
    z_loss_coef: float = at_least(0, 0.0)  # router z-loss

    def check(self, moe: "MoEConfig") -> None:
        """Cross-field rules of this router (ConfigError naming the key); subclasses extend."""


@dataclass
class SoftmaxAuxConfig(RouterConfig):
    kind: str = "softmax_aux"
    aux_loss_coef: float = at_least(0, 0.01)  # Switch/GShard load-balancing loss


@dataclass
class AuxFreeConfig(RouterConfig):
    kind: str = "aux_free"
    bias_update_rate: float = at_least(0, 1e-3)  # u in b_i += u * sign(mean load - load_i)
    seq_aux_coef: float = at_least(0, 0.0)  # complementary sequence-wise balance loss (DeepSeek-V3: 1e-4)
    seq_aux_indicator: SeqAuxIndicator = SeqAuxIndicator.unbiased  # which top-k that loss counts
    route_scale: float = positive(1.0)  # gates multiplied after normalisation (DeepSeek-V3: 2.5)
    n_groups: int = at_least(1, 1)  # group-limited routing over n_groups expert groups ...
    topk_groups: int = at_least(1, 1)  # ... of which each token may use this many

    def check(self, moe: "MoEConfig") -> None:
        if moe.n_routed % self.n_groups:
            raise ConfigError(
                f"model.ffn.router.n_groups={self.n_groups} must divide model.ffn.n_routed={moe.n_routed}"
            )
        if self.topk_groups > self.n_groups:
            raise ConfigError(
                f"model.ffn.router.topk_groups={self.topk_groups} is more than "
                f"model.ffn.router.n_groups={self.n_groups}"
            )
        if self.n_groups > 1 and self.topk_groups * (moe.n_routed // self.n_groups) < moe.top_k:
            raise ConfigError(
                f"model.ffn.router.topk_groups={self.topk_groups} groups of "
                f"{moe.n_routed // self.n_groups} experts cannot hold model.ffn.top_k={moe.top_k}"
            )


@dataclass
class BSLORouterConfig(RouterConfig):
    kind: str = "bslo"
    capacity_factor: float = positive(1.25)  # C = capacity_factor * tokens * top_k / n_routed
    temperature: float = positive(1.0)  # softmax temperature tau


@dataclass
class MoEConfig(FFNConfig):
    """Fine-grained routed experts plus shared experts (model/ffn=moe). The inherited dense fields size the
    leading dense blocks."""

    kind: str = "moe"
    n_routed: int = at_least(1, 8)  # routed experts per MoE layer
    n_shared: int = at_least(0, 1)  # shared experts (every token)
    top_k: int = at_least(1, 2)  # routed experts per token
    expert_hidden: int = at_least(1, 128)  # SwiGLU width of one routed (and one shared) expert
    first_dense: int = at_least(0, 1)  # the first k blocks keep a dense MLP
    router: Any = field(default_factory=RouterConfig)  # the router: model/ffn/router=none|softmax_aux|aux_free|bslo

    def check(self, model) -> None:
        if self.top_k > self.n_routed:
            raise ConfigError(f"model.ffn.top_k={self.top_k} is more than model.ffn.n_routed={self.n_routed} experts")
        if self.first_dense > model.n_layers:
            raise ConfigError(f"model.ffn.first_dense={self.first_dense} is more than model.n_layers={model.n_layers}")
        self.router.check(self)


def maxvio(load: torch.Tensor) -> float:
    """(max_i load_i - mean load) / mean load: 0 when perfectly balanced."""
    mean = load.float().mean()
    return ((load.float().max() - mean) / mean.clamp(min=1e-12)).item()


@ROUTERS.register("none", config=RouterConfig)
class Router(nn.Module):
    """Softmax top-K with the selected gates renormalised; subclasses change `route` (and `after_step`)."""

    def __init__(self, d_model: int, moe: MoEConfig):
        super().__init__()
        self.cfg, self.n_routed, self.top_k = moe.router, moe.n_routed, moe.top_k
        self.weight = nn.Parameter(torch.empty(moe.n_routed, d_model))
        reset_own_parameters(self)
        self.register_buffer("load", torch.zeros(moe.n_routed), persistent=False)  # tokens routed since reset
        self.aux_loss: torch.Tensor | None = None

    def init_parameter(self, name: str, t: torch.Tensor, generator: torch.Generator | None) -> None:
        t.normal_(0.0, 0.02, generator=generator)  # the gate's affinities start small and near-uniform

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> (expert indices [B, T, K], gates [B, T, K]); sets self.aux_loss in training."""
        logits = F.linear(x.float(), self.weight.float())  # routing math in fp32
        idx, gates, aux = self.route(logits)
        if self.training and self.cfg.z_loss_coef:
            aux = aux + self.cfg.z_loss_coef * torch.logsumexp(logits, dim=-1).pow(2).mean()
        self.aux_loss = aux if self.training else None
        with torch.no_grad():
            self.load.index_add_(0, idx.flatten(), torch.ones(idx.numel(), device=idx.device))
        return idx, gates.to(x.dtype)

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = torch.softmax(logits, dim=-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        return idx, top / top.sum(-1, keepdim=True), logits.new_zeros(())

    def after_step(self, load: torch.Tensor) -> None:
        """Balancing state update from the global batch's expert loads (the same on every rank)."""


@ROUTERS.register("softmax_aux", config=SoftmaxAuxConfig)
class SoftmaxAuxRouter(Router):
    def route(self, logits):
        idx, gates, aux = super().route(logits)
        if self.training:
            probs = torch.softmax(logits, dim=-1)
            f = torch.zeros_like(self.load).index_add_(0, idx.flatten(), torch.ones(idx.numel(), device=idx.device))
            f = f / idx.numel()
            aux = aux + self.cfg.aux_loss_coef * self.n_routed * (f * probs.flatten(0, -2).mean(0)).sum()
        return idx, gates, aux


@ROUTERS.register("aux_free", config=AuxFreeConfig)
class AuxFreeRouter(Router):
    def __init__(self, d_model: int, moe: MoEConfig):
        super().__init__(d_model, moe)
        # Selection-only bias: a buffer, so it is checkpointed and never gets a gradient.
        self.register_buffer("bias", torch.zeros(moe.n_routed))

    def route(self, logits):
        c = self.cfg
        scores = torch.sigmoid(logits)
        idx = self._select(scores.detach() + self.bias)
        gates = scores.gather(-1, idx)
        gates = gates / gates.sum(-1, keepdim=True) * c.route_scale
        aux = logits.new_zeros(())
        if self.training and c.seq_aux_coef:
            # DeepSeek-V3 counts f_i on the top-k of the raw affinities over all experts (no balancing bias)
            counted = scores.detach().topk(self.top_k, dim=-1).indices if c.seq_aux_indicator == "unbiased" else idx
            aux = aux + c.seq_aux_coef * self._seq_balance_loss(scores, counted)
        return idx, gates, aux

    def _select(self, biased: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if c.n_groups > 1:  # group-limited: rank groups by the sum of their top-2 biased scores
            grouped = biased.unflatten(-1, (c.n_groups, -1))
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score).scatter_(-1, group_score.topk(c.topk_groups, dim=-1).indices, 1.0)
            biased = grouped.masked_fill(keep.unsqueeze(-1) == 0, float("-inf")).flatten(-2)
        return biased.topk(self.top_k, dim=-1).indices

    def _seq_balance_loss(self, scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3's complementary sequence-wise loss sum_i f_i P_i, averaged over sequences ([B, T, E])."""
        T = scores.shape[-2]
        chosen = torch.zeros_like(scores).scatter_(-1, idx, 1.0)
        f = chosen.sum(-2) * self.n_routed / (self.top_k * T)
        p = (scores / scores.sum(-1, keepdim=True)).mean(-2)
        return (f * p).sum(-1).mean()

    def after_step(self, load: torch.Tensor) -> None:
        u = self.cfg.bias_update_rate
        if u:
            self.bias += u * torch.sign(load.mean() - load)


@ROUTERS.register("bslo", config=BSLORouterConfig)
class BSLORouter(Router):
    def route(self, logits):
        c = self.cfg
        probs = torch.softmax(logits / c.temperature, dim=-1)
        with torch.no_grad():  # N_i: tokens that would pick expert i; the capacity factor has no gradient
            wanted = torch.zeros_like(self.load).index_add_(
                0,
                probs.topk(self.top_k, dim=-1).indices.flatten(),
                torch.ones(probs[..., 0].numel() * self.top_k, device=logits.device),
            )
            capacity = c.capacity_factor * probs[..., 0].numel() * self.top_k / self.n_routed
            factor = (capacity / wanted.clamp(min=1)).clamp(max=1.0)
        gates, idx = (probs * factor).topk(self.top_k, dim=-1)
        return idx, gates, logits.new_zeros(())


class MoE(nn.Module):
    """Shared experts see every token; each token also goes to its top-K routed experts, weighted by the gates."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.router = ROUTERS[cfg.router.kind].obj(d_model, cfg)
        self.experts = nn.ModuleList(SwiGLU(d_model, cfg.expert_hidden) for _ in range(cfg.n_routed))
        self.shared = SwiGLU(d_model, cfg.n_shared * cfg.expert_hidden) if cfg.n_shared else None
        self.top_k = cfg.top_k
        # Expert parallelism (stabletrain.parallel.expert_parallel) swaps in an all-to-all dispatch from outside.
        self.dispatch = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, gates = self.router(x)
        flat = x.flatten(0, -2)
        token_of_slot = torch.arange(flat.shape[0], device=x.device).repeat_interleave(idx.shape[-1])
        dispatch = self.dispatch or self._local_dispatch
        out = dispatch(self.experts, flat, idx.flatten(), gates.flatten(), token_of_slot)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view_as(x)

    def active_fraction(self) -> float:
        """Share of the routed experts' parameters one token uses (top_k of n_routed)."""
        return self.top_k / self.router.n_routed

    @staticmethod
    def _local_dispatch(experts, flat, idx, gates, token_of_slot) -> torch.Tensor:
        # One batched call per expert over the tokens routed to it (no loop over tokens). An expert with no
        # tokens still runs on an empty batch, so its weights get (zero) gradients on every rank: data-parallel
        # gradient reduction needs the same set of gradients everywhere.
        out = torch.zeros_like(flat)
        order = idx.argsort(stable=True)
        counts = torch.bincount(idx, minlength=len(experts)).tolist()
        for expert, slots in zip(experts, order.split(counts)):
            tokens = token_of_slot[slots]
            out.index_add_(0, tokens, expert(flat[tokens]) * gates[slots, None])
        return out


@FEED_FORWARDS.register("moe", config=MoEConfig, node="moe_schema")
def moe_or_dense(d_model: int, cfg: MoEConfig, layer_index: int) -> nn.Module:
    """Block `layer_index`'s feed-forward: dense for the first `first_dense` blocks, MoE after."""
    return MoE(d_model, cfg) if layer_index >= cfg.first_dense else SwiGLU(d_model, cfg.dense_width(d_model))
