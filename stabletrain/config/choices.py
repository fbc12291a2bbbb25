"""The closed vocabularies of the schema: a value outside one fails at compose time, naming the key. Open sets
(residual streams, feed-forwards, routers, callbacks) come from registries instead."""

from __future__ import annotations

from stabletrain.config.fields import Choice


class ResidualInit(Choice):
    scaled = "scaled"
    plain = "plain"


class TokenizerModel(Choice):
    bpe = "bpe"
    unigram = "unigram"


class DataFormat(Choice):
    text = "text"
    pretokenized = "pretokenized"


class UTF8Errors(Choice):
    replace = "replace"
    strict = "strict"


class TokenDtype(Choice):
    auto = "auto"
    uint16 = "uint16"
    uint32 = "uint32"


class Offload(Choice):
    none = "none"
    cpu = "cpu"


class Backend(Choice):
    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


class PipelinePartition(Choice):  # how DeepSpeed's PipelineModule splits the layer list into stages
    parameters = "parameters"  # balance trainable parameters per stage
    uniform = "uniform"  # balance the number of layers per stage


class ActivationCheckpointing(Choice):
    none = "none"
    block = "block"  # recompute whole blocks (segments of engine.activation_checkpointing_blocks blocks)
    selective = "selective"  # keep the matmul and attention outputs, recompute the rest (norms, activations, mixing)


class DType(Choice):
    fp32 = "fp32"
    bf16 = "bf16"


class FP8Backend(Choice):
    emulate = "emulate"  # quantize -> dequantize -> fp32 matmul: the reference, runs anywhere
    scaled_mm = "scaled_mm"  # real E4M3 GEMMs (torch._scaled_mm), fp32 accumulation per 128-wide chunk
    torchao = "torchao"  # torchao.float8's training linears (pip install -e .[fp8])


class FP8Recipe(Choice):
    blockwise = "blockwise"  # DeepSeek-V3: 1x128 tiles for activations and gradients, 128x128 weight blocks
    rowwise = "rowwise"  # one scale per row of each operand (along the contracting dimension)
    tensorwise = "tensorwise"  # one scale per tensor


class Schedule(Choice):
    cosine = "cosine"
    wsd = "wsd"
    constant = "constant"
    step = "step"


class WandbMode(Choice):
    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"  # no W&B run (logging=none)


class Preflight(Choice):
    error = "error"  # a layout that does not fit stops the run before anything is allocated
    warn = "warn"  # says so and starts anyway
    off = "off"


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Response(Choice):
    log = "log"
    skip_step = "skip_step"
    rollback = "rollback"
    stop = "stop"
    escalate = "escalate"  # skip, then cut the learning rate, then roll back, then abort (monitor.escalate)


class NonfiniteResponse(Choice):  # a NaN/Inf update is never applied, so `log` is not offered
    skip_step = "skip_step"
    rollback = "rollback"
    stop = "stop"


class InjectKind(Choice):
    loss = "loss"
    nan_loss = "nan_loss"
    poison = "poison"


class DetectorStyle(Choice):
    stabletrain = "stabletrain"  # one-sided z-score over clean steps, plus the ratio rules
    olmo_core = "olmo_core"  # OLMo-core's SkipStepOptimizer: two-sided z-score over all recent steps
