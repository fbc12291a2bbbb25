"""stabletrain: pre-training of large language models that stay stable at scale."""

from pathlib import Path

__version__ = "0.1.0"

REPO_ROOT = Path(__file__).resolve().parent.parent


class StableTrainError(Exception):
    """A user-facing error: the entry point prints its message as one line and exits with status 2."""
