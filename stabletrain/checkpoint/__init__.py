"""Checkpoints: DeepSpeed's own save/load plus what it does not keep (RNG states, per-rank state, a manifest of
digests that proves a checkpoint complete and intact), in store.py; loading without executing code, in
safe_load.py; disk space and failed writes, in space.py."""

from stabletrain.checkpoint import safe_load, space
from stabletrain.checkpoint.store import (
    DIGEST,
    MANIFEST,
    SAVE_MARKER,
    TAG_RE,
    Rejection,
    candidates,
    check,
    file_digest,
    layout_of,
    legacy,
    load,
    load_rank_state,
    model_weights,
    newest_complete,
    rng_state,
    save,
    set_rng_state,
    step_of,
    tag_for,
    tags_newest_first,
    verify,
)

__all__ = [
    "DIGEST",
    "MANIFEST",
    "SAVE_MARKER",
    "TAG_RE",
    "Rejection",
    "candidates",
    "check",
    "file_digest",
    "layout_of",
    "legacy",
    "load",
    "load_rank_state",
    "model_weights",
    "newest_complete",
    "rng_state",
    "safe_load",
    "save",
    "set_rng_state",
    "space",
    "step_of",
    "tag_for",
    "tags_newest_first",
    "verify",
]
