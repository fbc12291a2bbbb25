"""Which modules are commands. `python -m stabletrain.<module>` runs any module of the package; one without an
`if __name__ == "__main__":` block would define its functions and exit 0, doing nothing, as a former entry point
that became a library module did (`python -m stabletrain.data.prepare ... out=DIR` wrote nothing). The package's
__init__ asks `refusal` about the module Python was told to run and stops such a run in one line (exit 2), naming
the command to use: nothing to add to a library module, and a new one is covered as it is written.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
_MAIN_BLOCK = re.compile(r"^if __name__ == [\"']__main__[\"']:", re.MULTILINE)
# Former entry points (docs and git history) and the command that does their work now.
MOVED = {
    "stabletrain.data.prepare": "stabletrain.cli.prepare",
    "stabletrain.data.tokenizer": "stabletrain.cli.tokenizer",
}


def _source(module: str) -> Path | None:
    """The file `python -m module` would run (a package runs its __main__.py), or None when it is not ours."""
    parts = module.split(".")
    if parts[0] != "stabletrain":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__main__.py", base / "__init__.py"):
        if path.is_file():
            return path
    return None


def commands() -> list[str]:
    """Every module of the package that is a command (has a main block)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if _MAIN_BLOCK.search(path.read_text()):
            parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] in ("__init__", "__main__") else parts))
    return found


def refusal(module: str) -> str | None:
    """The one-line error for running `module` as a program, or None (a command, or not one of ours)."""
    path = _source(module)
    if path is None or (path.name != "__init__.py" and _MAIN_BLOCK.search(path.read_text())):
        return None
    if module in MOVED:
        return f"stabletrain: error: {module} is a library module, not a command: use python -m {MOVED[module]}"
    listed = ", ".join(["python train.py"] + [f"python -m {m}" for m in commands()])
    return f"stabletrain: error: {module} is a library module, not a command (the commands: {listed})"


def module_run(argv: list[str]) -> str | None:
    """The module `python [options] -m MODULE ...` runs, from the interpreter's own argv (None: not run with -m)."""
    args = iter(argv[1:])
    for arg in args:
        if arg == "-m":
            return next(args, None)
        if arg.startswith("-m"):
            return arg[2:]
        if arg in ("-W", "-X"):  # options that take a value
            next(args, None)
        elif arg == "-c" or not arg.startswith("-"):
            return None
    return None


def refuse_library_module_run() -> None:
    """Called by the package's __init__: exit in one line when Python was asked to run a library module."""
    module = module_run(getattr(sys, "orig_argv", []))
    message = refusal(module) if module else None
    if message:
        print(message, file=sys.stderr)
        sys.exit(2)
