"""Expert parallelism, applied from outside the model: each rank of an expert-parallel (EP) group keeps
n_routed / ep of every MoE layer's routed experts, and tokens travel to their experts' rank by all-to-all.

    the data-parallel ranks of each pipeline stage form groups of ep consecutive ranks (the EP groups); data-parallel
    index d holds experts [(d % ep)·E/ep, (d % ep + 1)·E/ep) and shares them with the indices d' ≡ d (mod ep):
    its expert-data-parallel group

The router, the shared experts and everything else stay replicated and belong to DeepSpeed. The routed experts
are taken out of the module tree DeepSpeed sees and are owned here, so that DeepSpeed's reductions (ZeRO-0/1/2,
its bf16 optimizer, the pipeline's) can never average different experts together:

- gradients: the all-to-all backward already sums each expert's gradient over its EP group's tokens; the
  expert-data-parallel groups sum the replicas, and the result is divided by the data-parallel size, as
  DeepSpeed divides the replicated parameters' gradients;
- the update: an AdamW of our own over fp32 master weights (bf16 runs keep bf16 working copies, accumulating
  gradients in fp32 as DeepSpeed's bf16 optimizer does), applied inside the engine's gated step, with the
  engine's learning rate, only when the step is applied;
- the gradient norm for clipping and the spike detectors covers replicated parameters and every expert once;
- checkpoints: every rank writes its own experts and their optimizer state (`local_state`).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from stabletrain import StableTrainError
from stabletrain.config import RankLayout
from stabletrain.models.moe import MoE
from stabletrain.parallel import fp8


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


class _FP8AllToAll(torch.autograd.Function):
    """The dispatch all-to-all with the tokens in E4M3 (1 x 128 tiles, one fp32 scale per tile): half the bytes of
    bf16 on the wire. The receiver dequantizes; the backward sends the gradients back in their own precision."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        q = fp8.quantize(x, fp8.RECIPES["blockwise"][0])
        data = q.data.view(torch.uint8)
        out_data = data.new_empty((sum(recv), data.shape[1]))
        out_scales = q.scales.new_empty((sum(recv), q.scales.shape[1]))
        dist.all_to_all_single(out_data, data, output_split_sizes=recv, input_split_sizes=send, group=group)
        dist.all_to_all_single(
            out_scales, q.scales.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group
        )
        received = fp8.Quantized(out_data.view(fp8.E4M3), out_scales, q.block, (sum(recv), x.shape[1]))
        return received.dequantize().to(x.dtype)

    backward = _AllToAll.backward


class AllToAllDispatch:
    """Replaces MoE's local expert loop: send each (token, expert) slot to the expert's rank, run, send back."""

    def __init__(self, n_routed: int, ep: int, experts: nn.ModuleList, fp8_dispatch: bool = False):
        self.ep, self.experts = ep, experts  # the local experts: not a submodule of the model
        self.group = None  # the expert-parallel group, set once the process groups exist (ExpertParallel.setup)
        self.send_tokens = _FP8AllToAll.apply if fp8_dispatch else _AllToAll.apply
        self.per_rank = n_routed // ep

    def __call__(
        self,
        _unused: nn.ModuleList,  # MoE passes its (now empty) expert list
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
        received = self.send_tokens(flat[token_of_slot[order]], send, recv, self.group)
        # `received` is ordered (source rank, local expert): regroup by local expert, run each expert once.
        local_expert = torch.repeat_interleave(
            torch.arange(self.per_rank, device=idx.device).repeat(self.ep), recv_counts.flatten()
        )
        by_expert = local_expert.argsort(stable=True)
        per_expert = torch.bincount(local_expert, minlength=self.per_rank).tolist()
        # Experts with no tokens still run on an empty batch, so every rank has a gradient for every local expert.
        ran = torch.cat([expert(received[rows]) for expert, rows in zip(self.experts, by_expert.split(per_expert))])
        outputs = torch.empty_like(received).index_copy(0, by_expert, ran)
        returned = _AllToAll.apply(outputs, recv, send, self.group)
        out = torch.zeros_like(flat)
        return out.index_add(0, token_of_slot[order], returned * gates[order, None])


class ExpertParallel:
    """Builds the process groups, takes this rank's experts out of the model, and reduces, clips, updates and
    saves them."""

    def __init__(
        self, model: nn.Module, ep: int, layout: RankLayout, blocks: Iterable[int], fp8_dispatch: bool = False
    ):
        dp = layout.data_parallel
        if dp % ep:
            raise StableTrainError(f"engine.expert_parallel={ep} must divide the {dp} data-parallel rank(s)")
        self.ep, self.layout, self.replicas = ep, layout, dp // ep
        self.ep_rank = layout.dp_rank % ep
        self.local: dict[int, tuple[int, nn.ModuleList]] = {}  # block -> (first expert id, this rank's experts)
        self.dispatches: list[AllToAllDispatch] = []
        for i in blocks:
            moe = model.blocks[i].mlp
            if not isinstance(moe, MoE):
                continue
            n_routed = len(moe.experts)
            per_rank = n_routed // ep
            first = self.ep_rank * per_rank
            # Taken out of the module tree before anything is allocated: DeepSpeed never sees them, and the others
            # are never materialized on this rank.
            local = nn.ModuleList(list(moe.experts)[first : first + per_rank])
            moe.experts = nn.ModuleList()
            moe.dispatch = AllToAllDispatch(n_routed, ep, local, fp8_dispatch)  # its group comes with setup()
            self.dispatches.append(moe.dispatch)
            self.local[i] = (first, local)
        if not self.local and not any(isinstance(m, MoE) for m in model.modules()):
            raise StableTrainError(f"engine.expert_parallel={ep} needs a model with MoE layers (model/ffn=moe)")

    def named_local_experts(self) -> list[tuple[str, nn.Module]]:
        """This rank's experts under their names in the unsharded model (blocks.<i>.mlp.experts.<e>), each module
        of their trees."""
        return [
            (f"blocks.{i}.mlp.experts.{first + j}" + (f".{sub}" if sub else ""), module)
            for i, (first, local) in self.local.items()
            for j, expert in enumerate(local)
            for sub, module in expert.named_modules()
        ]

    def _create_groups(self) -> None:
        """The expert-parallel and expert-data-parallel process groups. Every rank creates every group, in the
        same order (new_group is collective)."""
        layout, ep, dp = self.layout, self.ep, self.layout.data_parallel
        self.ep_group = self.expert_dp_group = None
        for stage in range(layout.stages):
            ranks = layout.stage_ranks(stage)
            for g in range(dp // ep):
                group = dist.new_group(ranks[g * ep : (g + 1) * ep])
                if layout.rank in ranks[g * ep : (g + 1) * ep]:
                    self.ep_group = group
            for j in range(ep):
                group = dist.new_group(ranks[j::ep])
                if layout.rank in ranks[j::ep]:
                    self.expert_dp_group = group

    def setup(self, device, dtype, weight_decay: float, betas: tuple[float, float], eps: float) -> None:
        """After materialization (collective): the process groups, working weights in the training dtype, fp32
        masters and their AdamW."""
        self._create_groups()
        for dispatch in self.dispatches:
            dispatch.group = self.ep_group
        self.live: dict[str, nn.Parameter] = {}  # name (as in the unsharded model) -> this rank's working weight
        for i, (first, local) in self.local.items():
            local.to(device=device, dtype=dtype)
            for j, expert in enumerate(local):
                for pname, p in expert.named_parameters():
                    self.live[f"blocks.{i}.mlp.experts.{first + j}.{pname}"] = p
        # fp32 master weights: the working weights themselves in fp32 runs, copies in bf16 runs.
        self.master = {
            n: p if p.dtype == torch.float32 else nn.Parameter(p.detach().float()) for n, p in self.live.items()
        }
        for n, p in self.live.items():
            if self.master[n] is not p:
                p.register_post_accumulate_grad_hook(lambda p, m=self.master[n]: self._accumulate(p, m))
        masters = list(self.master.values())
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [m for m in masters if m.ndim >= 2], "weight_decay": weight_decay},
                {"params": [m for m in masters if m.ndim < 2], "weight_decay": 0.0},
            ],
            lr=0.0,
            betas=betas,
            eps=eps,
        )

    @staticmethod
    def _accumulate(p: torch.Tensor, master: torch.Tensor) -> None:
        """bf16 working weight -> fp32 gradient accumulator on the master (as DeepSpeed's bf16 optimizer does)."""
        g = p.grad.float()
        master.grad = g if master.grad is None else master.grad.add_(g)
        p.grad = None

    def reduce_gradients(self) -> torch.Tensor:
        """Average the experts' gradients over their replicas; returns the squared norm of every expert of every
        stage, counted once (collective over all ranks)."""
        grads = [m.grad if m.grad is not None else torch.zeros_like(m) for m in self.master.values()]
        flat = torch.cat([g.flatten() for g in grads]) if grads else torch.zeros(0)
        if self.replicas > 1:
            dist.all_reduce(flat, group=self.expert_dp_group)
        flat /= self.layout.data_parallel
        for m, g in zip(self.master.values(), flat.split([g.numel() for g in grads])):
            m.grad = g.view_as(m)
        sq = flat.double().pow(2).sum().reshape(1)
        if self.layout.world > 1:
            dist.all_reduce(sq)  # every expert is held by `replicas` ranks
        return (sq / self.replicas).float()[0]

    def scale_gradients(self, coef: torch.Tensor) -> None:
        for m in self.master.values():
            m.grad.mul_(coef.to(m.grad.dtype))

    def apply(self, lr: float) -> None:
        """The AdamW update at the engine's learning rate; bf16 working weights follow their masters."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        with torch.no_grad():
            for n, p in self.live.items():
                if self.master[n] is not p:
                    p.copy_(self.master[n])

    def zero_grad(self) -> None:
        for n, p in self.live.items():
            p.grad = None
            self.master[n].grad = None

    def first_nonfinite(self) -> str | None:
        for n, m in self.master.items():
            if not bool(torch.isfinite(m.detach()).all()):
                return f"expert weight {n}"
            for key, value in self.optimizer.state.get(m, {}).items():
                if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    return f"optimizer state {key} of expert {n}"
        return None

    def local_state(self) -> dict:
        """This rank's experts (fp32 masters) and their optimizer state, for a per-rank checkpoint file."""
        return {
            "layout": self._layout_key(),
            "params": {n: m.detach().clone() for n, m in self.master.items()},
            "optim": self.optimizer.state_dict(),
        }

    def load_local_state(self, state: dict) -> None:
        if state["layout"] != self._layout_key():
            saved, now = state["layout"], self._layout_key()
            raise StableTrainError(
                f"checkpoint was saved with engine.expert_parallel={saved['ep']} on {saved['world']} ranks in "
                f"{saved['stages']} pipeline stage(s); resume with the same layout (now {now['ep']} on "
                f"{now['world']} in {now['stages']})"
            )
        with torch.no_grad():
            for n, m in self.master.items():
                m.copy_(state["params"][n])
                if self.live[n] is not m:
                    self.live[n].copy_(m)
        self.optimizer.load_state_dict(state["optim"])

    def _layout_key(self) -> dict:
        return {"ep": self.ep, "world": self.layout.world, "stages": self.layout.stages}
