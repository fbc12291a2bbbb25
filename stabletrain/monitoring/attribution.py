"""Which documents a spike came from: the rows of the spiking batch are cut into their documents (a packed sequence
holds pieces of several), and each document is scored by its contribution to the batch's loss on the weights of
the spike: the sum over its target tokens in the batch of (token loss - the batch's mean token loss). A document
whose tokens the model finds much harder than the rest of the batch (corrupt text, a run of random or repeated
tokens) ranks first, whatever its length; a document the model finds as hard as the others contributes nothing,
however many rows it fills.

Each document is named by its source and record (its position in that source's training stream, 0-based, after any
documents held out for validation), with its tokens in the batch, mean loss, share of the batch's loss and the
start of its text.
"""

from __future__ import annotations

import numpy as np
import torch

TOP = 10  # documents listed in a report


def rank_documents(
    per_token_loss: torch.Tensor,
    sources: list[str],
    documents: np.ndarray,
    tokens: torch.Tensor,
    decode=None,
    top: int = TOP,
) -> list[dict]:
    """Documents of a batch, highest contribution first. per_token_loss [rows, T] (the loss of predicting target
    t), sources [rows], documents [rows, T] (the document of each target), tokens [rows, T + 1]."""
    loss = per_token_loss.detach().double().cpu().numpy()
    mean, total = loss.mean(), loss.sum()
    groups: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = {}
    for row, source in enumerate(sources):
        for doc in np.unique(documents[row]):
            groups.setdefault((source, int(doc)), []).append((row, documents[row] == doc))
    out = []
    for (source, record), parts in groups.items():
        values = np.concatenate([loss[row][mask] for row, mask in parts])
        first_row, first_mask = parts[0]
        ids = tokens[first_row, 1:][torch.from_numpy(first_mask)].tolist()[:48]
        out.append(
            {
                "source": source,
                "record": record,
                "rows": sorted({r for r, _ in parts}),
                "tokens": int(values.size),
                "contribution": float((values - mean).sum()),
                "mean_loss": float(values.mean()),
                "loss_share": float(values.sum() / total) if total else 0.0,
                "excerpt": decode(ids)[:100] if decode is not None else None,
            }
        )
    out.sort(key=lambda d: (-d["contribution"], -d["mean_loss"]))
    return out[:top]


def markdown(ranked: list[dict]) -> str:
    """The report's table of documents."""
    lines = [
        "| rank | source | record | rows | tokens | contribution | mean loss | share of loss | text |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, d in enumerate(ranked, 1):
        text = (d["excerpt"] or "").replace("\n", " ").replace("|", "/")[:60]
        lines.append(
            f"| {i} | {d['source']} | {d['record']} | {','.join(map(str, d['rows']))} | {d['tokens']} | "
            f"{d['contribution']:.1f} | {d['mean_loss']:.3f} | {d['loss_share']:.1%} | {text} |"
        )
    return "\n".join(lines)
