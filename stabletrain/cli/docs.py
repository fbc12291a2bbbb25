"""Write docs/configuration.md from the schemas, so the reference cannot drift from the code:

    python -m stabletrain.cli.docs            # rewrites docs/configuration.md
    python -m stabletrain.cli.docs --check    # exit 1 if the file is out of date (the test suite runs this)

Every field of every config dataclass (the schema and each registered component's config) with its type, default,
allowed values and the comment beside it in the source; the options of every config group.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import inspect
import sys
import typing
from pathlib import Path

from stabletrain import REPO_ROOT
from stabletrain.cli import setup
from stabletrain.config import Config, SourceConfig
from stabletrain.config.fields import Range
from stabletrain.data.sources import SOURCES
from stabletrain.models import FEED_FORWARDS, RESIDUAL_STREAMS, ROUTERS
from stabletrain.training.callbacks import CALLBACKS

OUT = REPO_ROOT / "docs" / "configuration.md"
GROUPS = ["model", "data", "engine", "precision", "optim", "logging", "trainer", "monitor", "experiment"]


def _comments(cls: type) -> dict[str, str]:
    """field name -> the comment at the end of its line, or else the comment lines right above it."""
    lines = inspect.getsourcelines(cls)[0]
    out = {}
    for node in ast.parse("".join(lines)).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        first = lines[node.lineno - 1]
        if "  # " in lines[node.end_lineno - 1]:
            out[node.target.id] = lines[node.end_lineno - 1].split("  # ", 1)[1].strip()
            continue
        above, i = [], node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip()[1:].strip())
            i -= 1
        out[node.target.id] = " ".join(above) if first else ""
    return out


def _type_name(tp) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(m.value for m in tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return f"{_type_name(args[0])} or null"
    if typing.get_origin(tp) in (list, typing.List):
        return f"list of {_type_name(args[0])}" if args else "list"
    if typing.get_origin(tp) in (dict, typing.Dict):
        return "mapping"
    return getattr(tp, "__name__", str(tp)).replace("Any", "a component (see below)")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if dataclasses.is_dataclass(value):
        return ""
    return "null" if value is None else str(value.value if isinstance(value, enum.Enum) else value)


def _range(f: dataclasses.Field) -> str:
    rng: Range | None = f.metadata.get("range")
    text = rng.describe() if rng else ""
    if f.metadata.get("length"):
        text = f"{f.metadata['length']} entries, each {text}"
    return text


def _table(cls: type, prefix: str, skip: set[str] = frozenset()) -> list[str]:
    hints, notes = typing.get_type_hints(cls), _comments_all(cls)
    rows, nested = ["| key | type | default | allowed | what it does |", "|---|---|---|---|---|"], []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested.append((tp, f"{prefix}.{f.name}"))
            continue
        shown = f.metadata.get("shown_type") or _type_name(tp)
        rows.append(
            f"| `{prefix}.{f.name}` | {_cell(shown)} | {_default(f)} | {_range(f)} | {_cell(notes.get(f.name, ''))} |"
        )
    out = rows
    for tp, key in nested:
        out += ["", f"`{key}`:", "", *_table(tp, key)]
    return out


def _comments_all(cls: type) -> dict[str, str]:
    """Comments of the class and its dataclass bases (subclasses override)."""
    notes: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base) and base is not object:
            notes.update({k: v for k, v in _comments(base).items() if v})
    return notes


def _yaml_options(group: str) -> list[str]:
    """One row per option: its name and the description at the top of its YAML (usage lines left out)."""
    out = []
    for path in sorted((REPO_ROOT / "conf" / group).glob("*.yaml")):
        words = []
        for line in path.read_text().splitlines():
            if not line.startswith("#") or line.startswith("#  "):
                break
            if not line.startswith("# @package"):
                words.append(line[1:].strip())
        out.append(f"| `{group}={path.stem}` | {_cell(' '.join(words))} |")
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _doc(cls: type) -> str:
    """The class docstring as one line; dataclasses without one get none (not their generated signature)."""
    doc = cls.__doc__ or ""
    return "" if doc.startswith(cls.__name__ + "(") else " ".join(doc.split())


def _registry(title: str, group: str, registry, shared: type | None = None) -> list[str]:
    """Each registered component of a group: its description and the fields it adds to its base config (`shared`:
    a base that is no option itself, whose fields every option has, shown first)."""
    lines = [f"### `{group}`: {title}", ""]
    if shared is not None:
        lines += [_doc(shared), "", *_table(shared, group.replace("/", "."), {"kind"}), ""]
    for entry in registry:
        base = entry.config.__mro__[1]
        is_base = not dataclasses.is_dataclass(base)
        inherited = set() if is_base else {f.name for f in dataclasses.fields(base)}
        lines += [f"`{group}={entry.name}`: {_doc(entry.config)}", ""]
        if is_base or {f.name for f in dataclasses.fields(entry.config)} - inherited - {"kind"}:
            lines += [*_table(entry.config, group.replace("/", "."), skip={"kind"} | inherited), ""]
    return lines


def render() -> str:
    setup()
    lines = [
        "# Configuration reference",
        "",
        "Generated from the schemas by `python -m stabletrain.cli.docs` (the test suite checks it is current).",
        "Every run composes one option of each group in `conf/config.yaml`; any key can be overridden on the "
        "command line (`python train.py optim.lr=3e-4 model/residual=mhc`). A value outside its range or "
        "vocabulary, a misspelt key or a wrong type fails before anything starts, in one line naming the key.",
        "",
    ]
    lines += ["## Config groups", "", "| option | what it is |", "|---|---|"]
    for group in GROUPS + ["model/ffn", "model/ffn/router"]:
        lines += _yaml_options(group)
    lines += [
        "",
        "## Components",
        "",
        "Open sets come from registries: a component registers itself with its config dataclass, which becomes "
        "an option of its group.",
        "",
    ]
    lines += _registry("the residual stream", "model/residual", RESIDUAL_STREAMS)
    lines += _registry("the feed-forward", "model/ffn", FEED_FORWARDS)
    lines += _registry("the MoE router (with model/ffn=moe)", "model/ffn/router", ROUTERS)
    lines += _registry("the document source", "data/source", SOURCES, shared=SourceConfig)
    lines += [
        "### `trainer.callbacks`",
        "",
        "Registered callbacks: " + ", ".join(f"`{n}`" for n in CALLBACKS.names()),
        "",
    ]
    lines += ["## Keys", ""]
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        lines += [f"### `{f.name}`", "", *_table(hints[f.name], f.name, skip={"residual", "ffn"}), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is out of date")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            sys.exit(f"{args.out} is out of date: run python -m stabletrain.cli.docs")
        return
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
