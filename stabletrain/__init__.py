"""stabletrain: pre-training of large language models that stay stable at scale."""

from pathlib import Path

from stabletrain.commands import refuse_library_module_run

__version__ = "0.1.0"

REPO_ROOT = Path(__file__).resolve().parent.parent


class StableTrainError(Exception):
    """A user-facing error: the entry point prints its message as one line and exits with `exit_status` (2; a full
    disk during a save: 28, docs/checkpoints.md)."""

    exit_status = 2


refuse_library_module_run()  # `python -m stabletrain.<a library module>` says which command to use (exit 2)
