"""Pipeline parallelism (`engine.pipeline_stages=P`) through DeepSpeed's PipelineModule and its 1F1B schedule.

The plain model is cut into a layer list, outside the model:

    EmbedLayer (embedding, stream expansion) | BlockLayer x S (segments of blocks) | HeadLayer (collapse, norm, head)

The list is partitioned over the stages (`engine.pipeline_partition`: by parameters, as DeepSpeed counts them, or
uniformly) before anything is allocated (`rank_plan`), so that each rank materializes only its stage; DeepSpeed's
PipelineModule is then handed those boundaries. A segment
is one block, or the blocks recomputed together under block-mode activation checkpointing, so recompute segments
never straddle a stage boundary. Between stages travels the residual stream (n streams for HC/mHC) and, where they
exist, a running sum of the MoE routers' auxiliary losses (added to the loss on the last stage, as the unpipelined
model adds them) and the document ids of packed sequences. With tied embeddings the embedding is a TiedLayerSpec on
the first and the last stage, whose gradients DeepSpeed all-reduces between the two.

The step: DeepSpeed runs the schedule (forward, backward, gradient reductions) but its optimizer step is held back
until the loss of the whole batch is known, so the spike guard can veto the update exactly as in data parallelism.
Diagnostics that are per layer (gains, MoE loads) are gathered from the stages (Engine.stage_gather).
"""

from __future__ import annotations

import contextlib
import io
import math

import torch
import torch.nn.functional as F
from deepspeed.pipe import PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
from torch import nn

from stabletrain.config import Config, ConfigError, RankLayout, checkpoint_segment
from stabletrain.config.layout import LAYOUT_RULES
from stabletrain.engine.base import LossHook, ModelKwargs, RankPlan
from stabletrain.engine.deepspeed_engine import DeepSpeedEngine
from stabletrain.parallel.materialize import Ownership, under
from stabletrain.planner.search import stage_bounds


class Carry:
    """What crosses a stage boundary: the stream, then the auxiliary-loss sum and the document ids when the run has
    them (DeepSpeed sends a tensor or a tuple of tensors)."""

    def __init__(self, aux: bool, doc_ids: bool):
        self.aux, self.doc_ids = aux, doc_ids

    def pack(self, x: torch.Tensor, aux: torch.Tensor | None, doc_ids: torch.Tensor | None):
        extra = ([aux] if self.aux else []) + ([doc_ids] if self.doc_ids else [])
        return (x, *extra) if extra else x

    def unpack(self, carry) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if not isinstance(carry, tuple):
            return carry, None, None
        x, rest = carry[0], list(carry[1:])
        aux = rest.pop(0) if self.aux else None
        return x, aux, rest.pop(0) if self.doc_ids else None


def _plain(module: nn.Module, model: nn.Module) -> None:
    module.__dict__["model"] = model  # a plain attribute: the layers register only the parts they own


class EmbedLayer(nn.Module):
    """Tokens [B, T] (or (tokens, doc_ids)) -> the expanded stream."""

    def __init__(self, model: nn.Module, carry: Carry):
        super().__init__()
        self.embed, self.carry = model.embed, carry
        _plain(self, model)

    def forward(self, inputs):
        idx, doc_ids = inputs if isinstance(inputs, tuple) else (inputs, None)
        x = self.model.embed_tokens(idx)
        # The running auxiliary loss starts as a zero that depends on the stream, so that every stage's outputs
        # have a gradient path (DeepSpeed runs backward on each floating-point output it sent).
        aux = x.float().sum().mul(0.0).reshape(1) if self.carry.aux else None
        return self.carry.pack(x, aux, doc_ids)


def tied_logits(layer: EmbedLayer, carry):
    """The last stage's use of the tied embedding: logits = h @ E^T."""
    h, aux, doc_ids = layer.carry.unpack(carry)
    return layer.carry.pack(F.linear(h, layer.embed.weight), aux, doc_ids)


class BlockLayer(nn.Module):
    """Blocks start..end-1 (one recompute segment)."""

    def __init__(self, model: nn.Module, start: int, end: int, carry: Carry):
        super().__init__()
        self.start, self.end, self.carry = start, end, carry
        self.blocks = nn.ModuleList(model.blocks[start:end])
        _plain(self, model)

    def forward(self, carry):
        x, aux, doc_ids = self.carry.unpack(carry)
        x = self.model.run_blocks(x, self.start, self.end, self.model.block_context(x, doc_ids))
        x = self.model.stream.materialize(x)
        if aux is not None and (mine := self.model.aux_loss(self.start, self.end)) is not None:
            aux = aux + mine.float().reshape(1)
        return self.carry.pack(x, aux, doc_ids)


class HeadLayer(nn.Module):
    """The collapse of the streams, the final norm and (untied) the output head."""

    def __init__(self, model: nn.Module, carry: Carry):
        super().__init__()
        self.stream, self.norm, self.carry = model.stream, model.norm, carry
        self.head = None if model.cfg.tie_embeddings else model.head

    def forward(self, carry):
        x, aux, doc_ids = self.carry.unpack(carry)
        h = self.norm(self.stream.collapse(x))
        return self.carry.pack(self.head(h) if self.head is not None else h, aux, None)


def layer_list(model: nn.Module, cfg: Config) -> list[tuple[str, list[str]]]:
    """The pipeline's layer list as (name, the model's modules the entry holds): the embedding, one entry per
    recomputed segment of blocks, the head, and with tied embeddings the embedding's second use on the last stage."""
    segment, L = checkpoint_segment(cfg), len(model.blocks)
    entries = [("embedding", ["embed"])]
    entries += [
        (f"blocks {s}-{min(s + segment, L) - 1}", [f"blocks.{i}" for i in range(s, min(s + segment, L))])
        for s in range(0, L, segment)
    ]
    entries.append(("head", ["stream", "norm"] + ([] if cfg.model.tie_embeddings else ["head"])))
    if cfg.model.tie_embeddings:
        entries.append(("tied embedding", ["embed"]))
    return entries


def check_pipeline(cfg: Config, world: int) -> None:
    """The pipeline's layout rules (registered in config.layout.LAYOUT_RULES, run by validate())."""
    e, P = cfg.engine, cfg.engine.pipeline_stages
    if P == 1:
        return
    if e.zero_stage >= 2:
        raise ConfigError(
            f"engine.pipeline_stages={P} runs with engine.zero_stage 0 or 1 (DeepSpeed's pipeline engine "
            f"refuses ZeRO-{e.zero_stage}, which would partition gradients the pipeline accumulates)"
        )
    if e.zero_stage == 0 and cfg.precision.dtype == "bf16":
        raise ConfigError(
            f"engine.pipeline_stages={P} with precision=bf16 needs engine=zero1 (DeepSpeed's bf16 pipeline on "
            "ZeRO-0 cannot load its own checkpoints)"
        )
    if e.offload_optimizer != "none":
        raise ConfigError(f"engine.offload_optimizer is not supported with engine.pipeline_stages={P}")
    layers = 2 + math.ceil(cfg.model.n_layers / checkpoint_segment(cfg))  # embedding, segments, head
    if P > layers:
        raise ConfigError(
            f"engine.pipeline_stages={P} is more than the {layers} layers of the pipeline's layer list "
            f"(embedding, {layers - 2} block segment(s), head)"
        )


LAYOUT_RULES.append(check_pipeline)


def _entry_blocks(name: str) -> range:
    if not name.startswith("blocks "):
        return range(0)
    first, last = (int(b) for b in name.split()[1].split("-"))
    return range(first, last + 1)


class PlannedPipelineModule(PipelineModule):
    """DeepSpeed's PipelineModule with the stage boundaries decided before the model was materialized: counting
    parameters again here would miss the experts that expert parallelism took out of the model."""

    def __init__(self, parts: list[int], **kwargs):
        object.__setattr__(self, "planned_parts", list(parts))
        super().__init__(**kwargs)

    def _partition_layers(self, method: str = "parameters") -> None:
        self.parts = list(self.planned_parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


def _hold_optimizer_step(engine, **kwargs) -> None:
    """Stands in for DeepSpeed's OptimizerStep instruction: the step runs after the batch's loss is known."""


class PipelineEngine(DeepSpeedEngine):
    """Pipeline stages x data parallelism (ZeRO-0/1, fp32 or bf16, expert parallelism inside each stage)."""

    @classmethod
    def rank_plan(cls, model: nn.Module, cfg: Config, layout: RankLayout) -> RankPlan:
        """This rank's stage: its layer-list entries, the blocks in them, and the modules they hold (the tied
        embedding on the first and the last stage)."""
        entries = layer_list(model, cfg)
        weights = [
            sum(p.numel() for m in mods for p in model.get_submodule(m).parameters() if p.requires_grad)
            for _, mods in entries
        ]
        parts = stage_bounds(weights, layout.stages, str(cfg.engine.pipeline_partition))
        mine = entries[parts[layout.stage] : parts[layout.stage + 1]]
        blocks = [b for name, _ in mine for b in _entry_blocks(name)]
        owned = under(m for _, mods in mine for m in mods)
        return RankPlan(range(blocks[0], blocks[-1] + 1) if blocks else range(0), Ownership(owns=owned), parts)

    def _wrap(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        self.carry = Carry(aux=bool(model.routers()), doc_ids=cfg.data.doc_mask)
        segment = checkpoint_segment(cfg)
        self.segments = [(s, min(s + segment, len(model.blocks))) for s in range(0, len(model.blocks), segment)]
        if cfg.model.tie_embeddings:
            first = TiedLayerSpec("embed", EmbedLayer, model, self.carry, tied_weight_attr="embed.weight")
            last = [
                HeadLayer(model, self.carry),
                TiedLayerSpec(
                    "embed", EmbedLayer, model, self.carry, forward_fn=tied_logits, tied_weight_attr="embed.weight"
                ),
            ]
        else:
            first, last = EmbedLayer(model, self.carry), [HeadLayer(model, self.carry)]
        layers = [first, *(BlockLayer(model, s, e, self.carry) for s, e in self.segments), *last]
        topology = PipeDataParallelTopology(num_pp=self.layout.stages, num_dp=self.layout.data_parallel)
        self.loss_hook: LossHook = lambda loss: loss
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its partition on rank 0
            module = PlannedPipelineModule(self.plan.parts, layers=layers, topology=topology, loss_fn=self._loss)
        self.parts = module.parts  # layer-list boundaries of the stages
        grid = module.mpu()
        self.dp_group, self.pipe_group = grid.get_data_parallel_group(), grid.get_pipe_parallel_group()
        return module

    def _loss(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        logits, aux, _ = self.carry.unpack(outputs)
        loss = self.model.loss(logits, labels)
        if aux is not None:
            loss = loss + aux.reshape(())
        return self.loss_hook(loss)

    def layer_blocks(self, first_layer: int, end_layer: int) -> range:
        """The blocks of layer-list entries first_layer..end_layer-1 (entry 1 + k is segment k)."""
        segs = [self.segments[i - 1] for i in range(first_layer, end_layer) if 1 <= i <= len(self.segments)]
        return range(segs[0][0], segs[-1][1]) if segs else range(0)

    def stage_blocks(self) -> range:
        stage = self.layout.stage
        return self.layer_blocks(self.parts[stage], self.parts[stage + 1])

    def _after_initialize(self) -> None:
        self.ds._INSTRUCTION_MAP = {**type(self.ds)._INSTRUCTION_MAP, schedule.OptimizerStep: _hold_optimizer_step}

    # ---------------------------------------------------------------- the step
    def _pipe_batch(self, batch: torch.Tensor, model_kwargs: ModelKwargs):
        doc_ids = model_kwargs(batch).get("doc_ids")
        inputs = (batch[:, :-1], doc_ids) if doc_ids is not None else batch[:, :-1]
        return inputs, batch[:, 1:]

    def forward_backward(self, batches: list[torch.Tensor], model_kwargs: ModelKwargs, loss_hook: LossHook):
        self.loss_hook = loss_hook
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints a progress line at its step 0
                self.ds.train_batch(iter([self._pipe_batch(b, model_kwargs) for b in batches]))
        finally:
            self.loss_hook = lambda loss: loss
        return self.ds.dp_group_loss.float().reshape(())  # this pipeline's mean, on every one of its stages

    def eval_loss(self, batch: torch.Tensor, model_kwargs: ModelKwargs) -> torch.Tensor:
        loss = self.ds.eval_batch(iter([self._pipe_batch(batch, model_kwargs)]), num_micro_batches=1)
        return loss.float().reshape(())

    def _optimizer_step(self) -> None:
        self.ds._exec_optimizer_step()

    def layout_record(self) -> dict:
        return {**super().layout_record(), "pipeline_layers": self.layer_names()}

    def layer_names(self) -> list[str]:
        """What each layer-list entry holds, for reading a checkpoint's layer files back into model names."""
        return [name for name, _ in layer_list(self.model, self.cfg)]
