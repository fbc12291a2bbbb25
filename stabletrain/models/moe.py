"""Mixture-of-Experts feed-forward: fine-grained routed experts plus shared experts (DeepSeekMoE).

Routers (methods.md §4, §6):
- none:        softmax top-K, gates renormalised over the selected experts, no balancing
- softmax_aux: the same plus the Switch/GShard load-balancing loss  coef * E * sum_i f_i P_i
- aux_free:    sigmoid affinities; a per-expert bias (a buffer, no gradient) only for selection; selected gates
               renormalised then * route_scale; the bias is updated outside the model after each optimizer step
               from loads counted over the global batch (stabletrain.training.callbacks.RouterBiasUpdate)
- bslo:        capacity-aware gating softmax(w x / tau) * min(1, C / N_i), top-K after scaling (experimental)
Every router counts how many tokens it sent to each expert (`load`), in training and in evaluation, for the
balance metrics and the bias update.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stabletrain.config import MoEConfig
from stabletrain.models.layers import SwiGLU


class Router(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed, d_model))
        nn.init.normal_(self.weight, std=0.02)
        # Selection-only bias of aux_free routing: a buffer, so it is checkpointed and never gets a gradient.
        self.register_buffer("bias", torch.zeros(cfg.n_routed))
        self.register_buffer("load", torch.zeros(cfg.n_routed), persistent=False)  # tokens routed since reset
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> (expert indices [B, T, K], gates [B, T, K]); sets self.aux_loss in training."""
        c = self.cfg
        logits = F.linear(x.float(), self.weight.float())  # routing math in fp32
        aux = logits.new_zeros(())
        if c.router == "aux_free":
            scores = torch.sigmoid(logits)
            idx = self._select(scores.detach() + self.bias)
            gates = scores.gather(-1, idx)
            gates = gates / gates.sum(-1, keepdim=True) * c.route_scale
            if self.training and c.seq_aux_coef:
                # DeepSeek-V3 counts f_i on the top-k of the raw affinities over all experts (no balancing bias)
                counted = scores.detach().topk(c.top_k, dim=-1).indices if c.seq_aux_indicator == "unbiased" else idx
                aux = aux + c.seq_aux_coef * self._seq_balance_loss(scores, counted)
        elif c.router == "bslo":
            probs = torch.softmax(logits / c.temperature, dim=-1)
            with torch.no_grad():  # N_i: tokens that would pick expert i; the capacity factor has no gradient
                wanted = torch.zeros_like(self.load).index_add_(
                    0, probs.topk(c.top_k, dim=-1).indices.flatten(), torch.ones(probs[..., 0].numel() * c.top_k, device=x.device))
                capacity = c.capacity_factor * probs[..., 0].numel() * c.top_k / c.n_routed
                factor = (capacity / wanted.clamp(min=1)).clamp(max=1.0)
            scaled = probs * factor
            gates, idx = scaled.topk(c.top_k, dim=-1)
        else:  # none | softmax_aux
            probs = torch.softmax(logits, dim=-1)
            top, idx = probs.topk(c.top_k, dim=-1)
            gates = top / top.sum(-1, keepdim=True)
            if self.training and c.router == "softmax_aux":
                f = torch.zeros_like(self.load).index_add_(0, idx.flatten(), torch.ones(idx.numel(), device=x.device))
                f = f / idx.numel()
                aux = aux + c.aux_loss_coef * c.n_routed * (f * probs.flatten(0, -2).mean(0)).sum()
        if self.training and c.z_loss_coef:
            aux = aux + c.z_loss_coef * torch.logsumexp(logits, dim=-1).pow(2).mean()
        self.aux_loss = aux if self.training else None
        with torch.no_grad():
            self.load.index_add_(0, idx.flatten(), torch.ones(idx.numel(), device=idx.device))
        return idx, gates.to(x.dtype)

    def _select(self, biased: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if c.n_groups > 1:  # group-limited: rank groups by the sum of their top-2 biased scores
            grouped = biased.unflatten(-1, (c.n_groups, -1))
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score).scatter_(-1, group_score.topk(c.topk_groups, dim=-1).indices, 1.0)
            biased = grouped.masked_fill(keep.unsqueeze(-1) == 0, float("-inf")).flatten(-2)
        return biased.topk(c.top_k, dim=-1).indices

    def _seq_balance_loss(self, scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3's complementary sequence-wise loss sum_i f_i P_i, averaged over sequences ([B, T, E])."""
        c = self.cfg
        T = scores.shape[-2]
        chosen = torch.zeros_like(scores).scatter_(-1, idx, 1.0)
        f = chosen.sum(-2) * c.n_routed / (c.top_k * T)
        p = (scores / scores.sum(-1, keepdim=True)).mean(-2)
        return (f * p).sum(-1).mean()


class MoE(nn.Module):
    """Shared experts see every token; each token also goes to its top-K routed experts, weighted by the gates."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.router = Router(d_model, cfg)
        self.experts = nn.ModuleList(SwiGLU(d_model, cfg.expert_hidden) for _ in range(cfg.n_routed))
        self.shared = SwiGLU(d_model, cfg.n_shared * cfg.expert_hidden) if cfg.n_shared else None
        # Expert parallelism (stabletrain.engine.expert_parallel) swaps in an all-to-all dispatch from outside.
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
