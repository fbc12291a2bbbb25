"""`python -m stabletrain.export | generate | evaluate`: key=value arguments after a path, one-line errors.

python -m stabletrain.export RUN_DIR out=DIR [format=hf|safetensors] [dtype=fp32|bf16] [step=N]
python -m stabletrain.generate RUN_DIR|EXPORT_DIR prompt="..." [max_new_tokens=64] [temperature=0] [top_p=1]
    [seed=0] [use_cache=true]
python -m stabletrain.evaluate RUN_DIR [step=N] [max_docs=N] [lm_eval_task=DIR] [data=<name> data.<key>=...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from stabletrain import StableTrainError
from stabletrain.cli import compose_config
from stabletrain.config import ConfigError
from stabletrain.data.tokenizer import Tokenizer
from stabletrain.interop.evaluate import documents, evaluate, lm_eval_task
from stabletrain.interop.export import export
from stabletrain.interop.generate import Sampling, generate, load_for_generation
from stabletrain.interop.run import load_run

BOOL = {"true": True, "false": False}


def parse(argv: list[str], usage: str, keys: dict[str, type], passthrough: str | None = None):
    """(path, {key: value}, [passed-through overrides]) or a one-line error."""
    if not argv or "=" in argv[0] or argv[0] in ("-h", "--help"):
        raise SystemExit(usage)
    values, rest = {}, []
    for arg in argv[1:]:
        key, eq, value = arg.partition("=")
        if not eq:
            raise StableTrainError(f"{arg!r}: arguments are key=value ({usage.splitlines()[0]})")
        if passthrough and (key == passthrough or key.startswith(passthrough + ".")):
            rest.append(arg)
            continue
        if key not in keys:
            raise StableTrainError(f"unknown argument {key!r} (one of: {', '.join(keys)})")
        try:
            values[key] = BOOL[value.lower()] if keys[key] is bool else keys[key](value)
        except (ValueError, KeyError):
            raise StableTrainError(f"{key}={value}: expected {keys[key].__name__}") from None
    return Path(argv[0]), values, rest


def _main(fn, argv: list[str] | None) -> None:
    try:
        fn(sys.argv[1:] if argv is None else argv)
    except (StableTrainError, ConfigError) as e:
        raise SystemExit(f"stabletrain: error: {e}") from None


def export_main(argv: list[str] | None = None) -> None:
    def run(argv):
        usage = "usage: python -m stabletrain.export RUN_DIR out=DIR [format=hf|safetensors] [dtype=fp32|bf16] [step=N]"
        path, kv, _ = parse(argv, usage, {"out": str, "format": str, "dtype": str, "step": int})
        if "out" not in kv:
            raise StableTrainError(f"out=DIR is required ({usage})")
        fmt, dtype = kv.get("format", "hf"), kv.get("dtype", "fp32")
        if fmt not in ("hf", "safetensors"):  # before the checkpoint is read
            raise StableTrainError(f"format={fmt}: unknown export format (one of: hf, safetensors)")
        if Path(kv["out"]).exists():
            raise StableTrainError(
                f"out={kv['out']} already exists; choose a new directory (an export never overwrites)"
            )
        print(export(load_run(path, kv.get("step")), Path(kv["out"]), fmt, dtype))

    _main(run, argv)


def generate_main(argv: list[str] | None = None) -> None:
    def run(argv):
        usage = (
            'usage: python -m stabletrain.generate RUN_DIR|EXPORT_DIR prompt="..." [max_new_tokens=N] [temperature=T]'
        )
        keys = {
            "prompt": str,
            "max_new_tokens": int,
            "temperature": float,
            "top_p": float,
            "seed": int,
            "use_cache": bool,
        }
        path, kv, _ = parse(argv, usage, keys)
        model, encode, decode, eos = load_for_generation(path)
        ids = torch.tensor([[eos, *encode(kv.get("prompt", ""))]])
        s = Sampling(**{k: kv[k] for k in ("max_new_tokens", "temperature", "top_p", "seed") if k in kv})
        new = generate(model, ids, s, eos, use_cache=kv.get("use_cache", True))[0].tolist()
        print(decode([t for t in new if t != eos]))

    _main(run, argv)


def evaluate_main(argv: list[str] | None = None) -> None:
    def run(argv):
        usage = "usage: python -m stabletrain.evaluate RUN_DIR [step=N] [max_docs=N] [lm_eval_task=DIR] [data=...]"
        path, kv, overrides = parse(argv, usage, {"step": int, "max_docs": int, "lm_eval_task": str}, "data")
        trained = load_run(path, kv.get("step"))
        data = compose_config(overrides).data if overrides else trained.data_cfg
        tok = Tokenizer(trained.tokenizer_path)  # the model's own vocabulary, whatever the data
        if "lm_eval_task" in kv:
            task = lm_eval_task((t for _, t in documents(data, kv.get("max_docs"))), Path(kv["lm_eval_task"]))
            print(f"wrote {task} (lm_eval --tasks {task.stem} --include_path {task.parent} "
                  f"--model_args pretrained=EXPORT_DIR,prefix_token_id={tok.eos_id})")  # fmt: skip
        encode = lambda text: tok.encode([text])[0]  # noqa: E731
        scores = evaluate(trained.model(), data, encode, tok.eos_id, kv.get("max_docs"))
        print(f"step {trained.step} of {path}, data {data.name}, windows of {data.seq_len} tokens")
        for name, score in scores.items():
            print(score.line(name))

    _main(run, argv)
