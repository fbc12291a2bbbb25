"""key=value arguments after a path, read into a dataclass whose fields carry their ranges and vocabularies (the
helpers of stabletrain.config.fields), as the training config's do: one-line errors naming the argument.

    path, args, rest = parse(argv, usage, GenerateArgs)    # GenerateArgs: a dataclass of defaults and ranges
"""

from __future__ import annotations

import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from stabletrain import StableTrainError
from stabletrain.config.fields import Choice, check_ranges


class Usage(Exception):
    """No path given (or -h): print the usage."""


def _convert(key: str, value: str, tp: Any) -> Any:
    options = [a for a in typing.get_args(tp) if a is not type(None)]
    tp = options[0] if options else tp  # Optional[X] -> X
    try:
        if tp is bool:
            return {"true": True, "false": False}[value.lower()]
        return tp(value)
    except (ValueError, KeyError):
        if tp is bool:
            expected = "true or false"
        elif isinstance(tp, type) and issubclass(tp, Choice):
            expected = "one of " + ", ".join(tp)
        else:
            expected = {int: "an integer", float: "a number"}.get(tp, tp.__name__)
        raise StableTrainError(f"{key}={value}: expected {expected}") from None


def parse(argv: list[str], usage: str, schema: type, passthrough: str | None = None):
    """(path, schema instance with every range checked, [passed-through overrides]) or a one-line error."""
    if not argv or argv[0] in ("-h", "--help"):
        raise Usage(usage)
    if "=" in argv[0]:
        raise StableTrainError(f"{argv[0]!r}: the first argument is a path ({usage})")
    hints = typing.get_type_hints(schema)
    names = [f.name for f in fields(schema)]
    values, rest = {}, []
    for arg in argv[1:]:
        key, eq, value = arg.partition("=")
        if not eq:
            raise StableTrainError(f"{arg!r}: arguments are key=value ({usage})")
        if passthrough and (key == passthrough or key.startswith(passthrough + ".")):
            rest.append(arg)
            continue
        if key not in names:
            raise StableTrainError(f"unknown argument {key!r} (one of: {', '.join(names)})")
        values[key] = _convert(key, value, hints[key])
    args = schema(**values)
    check_ranges(args, "")
    return Path(argv[0]), args, rest
