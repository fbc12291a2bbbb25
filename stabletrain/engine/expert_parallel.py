"""Expert parallelism, applied from outside the model: each rank of an expert-parallel (EP) group keeps
n_routed / ep of every MoE layer's routed experts, and tokens travel to their experts' rank by all-to-all.

    ranks 0..W-1 form W/ep EP groups of ep consecutive ranks; rank r holds experts
    [(r % ep)·E/ep, (r % ep + 1)·E/ep) and shares them with the ranks r' ≡ r (mod ep): its expert-data-parallel group

The router, the shared experts and everything else stay replicated. Gradients: DeepSpeed's own all-reduce
would average different experts together, so it is switched off and `reduce_gradients` averages the
replicated parameters over all ranks and the local experts over their expert-data-parallel group (both divided
by W: an expert's gradient already sums the losses of its whole EP group through the all-to-all backward).
DeepSpeed writes the model and optimizer state from rank 0 only, so every rank also saves its own experts and
their optimizer state (`local_state` / `load_local_state`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from stabletrain import StableTrainError
from stabletrain.models.moe import MoE


class _AllToAll(torch.autograd.Function):
    """dist.all_to_all_single with uneven splits; the backward sends the gradients back the way they came."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(
            out, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv, group=ctx.group
        )
        return out, None, None, None


class AllToAllDispatch:
    """Replaces MoE's local expert loop: send each (token, expert) slot to the expert's rank, run, send back."""

    def __init__(self, n_routed: int, ep: int, ep_rank: int, group):
        self.ep, self.ep_rank, self.group = ep, ep_rank, group
        self.per_rank = n_routed // ep

    def __call__(
        self,
        experts: nn.ModuleList,
        flat: torch.Tensor,
        idx: torch.Tensor,
        gates: torch.Tensor,
        token_of_slot: torch.Tensor,
    ) -> torch.Tensor:
        order = idx.argsort(stable=True)  # by global expert id, hence by owning rank
        counts = torch.bincount(idx, minlength=self.ep * self.per_rank).view(self.ep, self.per_rank)
        recv_counts = torch.empty_like(counts)  # [source rank, local expert]
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        send, recv = counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        received = _AllToAll.apply(flat[token_of_slot[order]], send, recv, self.group)
        # `received` is ordered (source rank, local expert): regroup by local expert, run each expert once.
        local_expert = torch.repeat_interleave(
            torch.arange(self.per_rank, device=idx.device).repeat(self.ep), recv_counts.flatten()
        )
        by_expert = local_expert.argsort(stable=True)
        per_expert = torch.bincount(local_expert, minlength=self.per_rank).tolist()
        # Experts with no tokens still run on an empty batch, so every rank has a gradient for every local expert.
        ran = torch.cat([expert(received[rows]) for expert, rows in zip(experts, by_expert.split(per_expert))])
        outputs = torch.empty_like(received).index_copy(0, by_expert, ran)
        returned = _AllToAll.apply(outputs, recv, send, self.group)
        out = torch.zeros_like(flat)
        return out.index_add(0, token_of_slot[order], returned * gates[order, None])


class ExpertParallel:
    """Builds the process groups, shards the experts of every MoE layer, and reduces and saves their state."""

    def __init__(self, model: nn.Module, ep: int, world: int, rank: int):
        if world % ep:
            raise StableTrainError(f"engine.expert_parallel={ep} must divide the number of ranks ({world})")
        self.ep, self.world = ep, world
        self.ep_rank = rank % ep
        # Every rank creates every group, in the same order (new_group is collective).
        self.ep_group = self.expert_dp_group = None
        for g in range(world // ep):
            group = dist.new_group(list(range(g * ep, (g + 1) * ep)))
            if rank // ep == g:
                self.ep_group = group
        for j in range(ep):
            group = dist.new_group(list(range(j, world, ep)))
            if self.ep_rank == j:
                self.expert_dp_group = group
        self.expert_params: dict[str, nn.Parameter] = {}
        for name, moe in model.named_modules():
            if not isinstance(moe, MoE):
                continue
            n_routed = len(moe.experts)
            if n_routed % ep:
                raise StableTrainError(f"model.ffn.n_routed={n_routed} is not divisible by engine.expert_parallel={ep}")
            per_rank = n_routed // ep
            # All ranks built the full model from one seed, so the kept experts equal the unsharded model's.
            moe.experts = nn.ModuleList(list(moe.experts)[self.ep_rank * per_rank : (self.ep_rank + 1) * per_rank])
            moe.dispatch = AllToAllDispatch(n_routed, ep, self.ep_rank, self.ep_group)
            for pname, p in moe.experts.named_parameters():
                self.expert_params[f"{name}.experts.{pname}"] = p
        if not self.expert_params:
            raise StableTrainError(f"engine.expert_parallel={ep} needs a model with MoE layers (model/ffn=moe)")
        # DeepSpeed broadcasts every parameter from rank 0 when it builds the engine, experts included.
        self._initial = {n: p.detach().clone() for n, p in self.expert_params.items()}
        expert_ids = {id(p) for p in self.expert_params.values()}
        self.replicated = [p for p in model.parameters() if p.requires_grad and id(p) not in expert_ids]

    def restore_experts(self) -> None:
        """Undo DeepSpeed's initial broadcast for the experts (call once, right after building the engine)."""
        with torch.no_grad():
            for n, p in self.expert_params.items():
                p.copy_(self._initial[n])
        self._initial = {}

    def reduce_gradients(self) -> None:
        """Average gradients: replicated parameters over all ranks, local experts over their expert-DP group."""
        for params, group in ((self.replicated, None), (list(self.expert_params.values()), self.expert_dp_group)):
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.flatten() for g in grads])
            if group is None or self.world // self.ep > 1:
                dist.all_reduce(flat, group=group)
            flat /= self.world
            for p, g in zip(params, flat.split([g.numel() for g in grads])):
                p.grad = g.view_as(p)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global pre-clip norm over all experts of all ranks plus the replicated parameters; clips in place."""
        experts = list(self.expert_params.values())
        sq_experts = torch.stack([p.grad.float().pow(2).sum() for p in experts]).sum()
        dist.all_reduce(sq_experts, group=self.ep_group)  # the EP group together holds every expert once
        sq_rest = torch.stack([p.grad.float().pow(2).sum() for p in self.replicated]).sum()
        norm = (sq_experts + sq_rest).sqrt()
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in experts + self.replicated:
            p.grad.mul_(scale.to(p.grad.dtype))
        return norm

    def local_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """This rank's experts and their optimizer state, for a per-rank checkpoint file."""
        return {
            "ep": self.ep,
            "world": self.world,
            "ep_rank": self.ep_rank,
            "params": {n: p.detach().clone() for n, p in self.expert_params.items()},
            "optim": {n: optimizer.state.get(p, {}) for n, p in self.expert_params.items()},
        }

    def load_local_state(self, state: dict, optimizer: torch.optim.Optimizer) -> None:
        if (state["ep"], state["world"]) != (self.ep, self.world):
            raise StableTrainError(
                f"checkpoint was saved with engine.expert_parallel={state['ep']} on "
                f"{state['world']} ranks; resume with the same layout "
                f"(now {self.ep} on {self.world})"
            )
        with torch.no_grad():
            for n, p in self.expert_params.items():
                p.copy_(state["params"][n])
                if state["optim"][n]:
                    optimizer.state[p] = {
                        k: v.clone() if torch.is_tensor(v) else v for k, v in state["optim"][n].items()
                    }
