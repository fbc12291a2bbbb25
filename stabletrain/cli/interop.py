"""`python -m stabletrain.export | generate | evaluate`: key=value arguments after a path, each with its range
(ExportArgs, GenerateArgs, EvaluateArgs), checked before anything is read; one-line errors, exit status 2.

python -m stabletrain.export RUN_DIR out=DIR [format=hf|safetensors] [dtype=fp32|bf16] [step=N]
python -m stabletrain.generate RUN_DIR|EXPORT_DIR prompt="..." [max_new_tokens=64] [temperature=0] [top_p=1]
    [seed=0] [use_cache=true]
python -m stabletrain.evaluate RUN_DIR [step=N] [max_docs=N] [lm_eval_task=DIR] [data=<name> data.<key>=...]

Each takes accept_legacy_checkpoints=true, as training does, to read a checkpoint whose manifest has no digests.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch

from stabletrain import StableTrainError
from stabletrain.cli import compose_config
from stabletrain.cli.args import Usage, parse
from stabletrain.config.fields import Choice, at_least
from stabletrain.data.tokenizer import Tokenizer
from stabletrain.interop.evaluate import documents, evaluate, lm_eval_task
from stabletrain.interop.export import export
from stabletrain.interop.generate import Sampling, generate, load_for_generation
from stabletrain.interop.run import load_run


class ExportFormat(Choice):
    hf = "hf"
    safetensors = "safetensors"


class ExportDType(Choice):
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class ExportArgs:
    out: Optional[str] = None  # required: a directory that does not exist yet
    format: ExportFormat = ExportFormat.hf
    dtype: ExportDType = ExportDType.fp32
    step: Optional[int] = at_least(0, None)  # null: the newest intact checkpoint
    accept_legacy_checkpoints: bool = False


@dataclass
class GenerateArgs(Sampling):  # max_new_tokens, temperature, top_p, seed with their ranges
    prompt: str = ""
    use_cache: bool = True
    accept_legacy_checkpoints: bool = False


@dataclass
class EvaluateArgs:
    step: Optional[int] = at_least(0, None)  # null: the newest intact checkpoint
    max_docs: Optional[int] = at_least(1, None)  # per source; null: every validation document
    lm_eval_task: Optional[str] = None  # also write the documents as an lm-evaluation-harness task in this directory
    accept_legacy_checkpoints: bool = False


def _main(fn, argv: list[str] | None) -> None:
    try:
        fn(sys.argv[1:] if argv is None else argv)
    except Usage as usage:
        print(usage, file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    except StableTrainError as e:  # ConfigError included (an argument out of range)
        print(f"stabletrain: error: {e}", file=sys.stderr)
        sys.exit(e.exit_status)


def export_main(argv: list[str] | None = None) -> None:
    def run(argv):
        usage = "usage: python -m stabletrain.export RUN_DIR out=DIR [format=hf|safetensors] [dtype=fp32|bf16] [step=N]"
        path, a, _ = parse(argv, usage, ExportArgs)
        if a.out is None:
            raise StableTrainError(f"out=DIR is required ({usage})")
        if Path(a.out).exists():  # before the checkpoint is read
            raise StableTrainError(f"out={a.out} already exists; choose a new directory (an export never overwrites)")
        trained = load_run(path, a.step, a.accept_legacy_checkpoints)
        print(export(trained, Path(a.out), str(a.format), str(a.dtype)))

    _main(run, argv)


def generate_main(argv: list[str] | None = None) -> None:
    def run(argv):
        usage = (
            'usage: python -m stabletrain.generate RUN_DIR|EXPORT_DIR prompt="..." [max_new_tokens=N] [temperature=T] '
            "[top_p=P] [seed=N] [use_cache=true|false]"
        )
        path, a, _ = parse(argv, usage, GenerateArgs)
        model, encode, decode, eos = load_for_generation(path, a.accept_legacy_checkpoints)
        ids = torch.tensor([[eos, *encode(a.prompt)]])
        sampling = Sampling(**{f.name: getattr(a, f.name) for f in fields(Sampling)})
        new = generate(model, ids, sampling, eos, use_cache=a.use_cache)[0].tolist()
        print(decode([t for t in new if t != eos]))

    _main(run, argv)


def evaluate_main(argv: list[str] | None = None) -> None:
    def run(argv):
        usage = "usage: python -m stabletrain.evaluate RUN_DIR [step=N] [max_docs=N] [lm_eval_task=DIR] [data=...]"
        path, a, overrides = parse(argv, usage, EvaluateArgs, "data")
        trained = load_run(path, a.step, a.accept_legacy_checkpoints)
        data = compose_config(overrides).data if overrides else trained.data_cfg
        tok = Tokenizer(trained.tokenizer_path)  # the model's own vocabulary, whatever the data
        if a.lm_eval_task is not None:
            task = lm_eval_task((t for _, t in documents(data, a.max_docs)), Path(a.lm_eval_task))
            print(
                f"wrote {task} (lm_eval --tasks {task.stem} --include_path {task.parent} "
                f"--model_args pretrained=EXPORT_DIR,prefix_token_id={tok.eos_id})"
            )
        encode = lambda text: tok.encode([text])[0]  # noqa: E731
        scores = evaluate(trained.model(), data, encode, tok.eos_id, a.max_docs)
        print(f"step {trained.step} of {path}, data {data.name}, windows of {data.seq_len} tokens")
        for name, score in scores.items():
            print(score.line(name))

    _main(run, argv)
