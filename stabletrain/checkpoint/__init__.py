"""Checkpoints: DeepSpeed's own save/load plus what it does not keep (RNG states, per-rank state, a manifest of
digests that proves a checkpoint complete and intact), in store.py; loading without executing code, in
safe_load.py."""

from stabletrain.checkpoint import safe_load
from stabletrain.checkpoint.store import (
    DIGEST,
    MANIFEST,
    TAG_RE,
    Rejection,
    candidates,
    check,
    file_digest,
    layout_of,
    load,
    load_rank_state,
    model_weights,
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
    "TAG_RE",
    "Rejection",
    "candidates",
    "check",
    "file_digest",
    "layout_of",
    "load",
    "load_rank_state",
    "model_weights",
    "rng_state",
    "safe_load",
    "save",
    "set_rng_state",
    "step_of",
    "tag_for",
    "tags_newest_first",
    "verify",
]
