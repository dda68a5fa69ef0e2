"""Free-text loss of a circuit: how much of the model's general behaviour it keeps.

Documents come from a plain text file (one document per line; blank lines skipped) or a ``datasets``
dataset saved to disk (``save_to_disk`` directory; a ``DatasetDict`` uses its ``test`` split, else
its first) with a ``text`` column. Each document is tokenized on its own (with the tokenizer's
special tokens, e.g. BOS) and scored in sliding windows of ``max_length`` tokens that advance by
``stride`` (default ``max_length``: disjoint windows): every token is predicted once, in the first
window that has it as a target, with the window's earlier tokens as context (the perplexity recipe
of HF's docs, per document). Metrics, token-weighted over every scored token:
``loss_full`` and ``loss_circuit`` (next-token cross-entropy, nats), ``kl`` (mean
KL(p_full || p_circuit)), ``tokens``, ``windows``, ``documents``.

Interchange ablation has no corrupted text here: run with ablation ``zero`` or ``mean`` (``mean``:
the mean writer states over the evaluated windows themselves, unless the model already has some).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .eval import kl_divergence


@dataclass
class Window:
    ids: torch.Tensor  # (L,) token ids
    score_from: int  # targets ids[score_from:] are scored (predicted from position score_from - 1)


def read_documents(source: str | Path) -> list[str]:
    """The documents of a text file (one per line) or a ``datasets`` directory with a ``text`` column."""
    path = Path(source)
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk  # heavy: only a datasets directory pays for it

        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            ds = ds["test"] if "test" in ds else ds[next(iter(ds))]
        if "text" not in ds.column_names:
            raise ValueError(f"{path}: the dataset has no 'text' column (columns: {', '.join(ds.column_names)})")
        docs = [t for t in ds["text"] if isinstance(t, str) and t.strip()]
    elif path.is_file():
        try:
            docs = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    else:
        raise FileNotFoundError(f"--text {path}: no such file or directory")
    if not docs:
        raise ValueError(f"{path}: no text (the file is empty or every line is blank)")
    return docs


def windows(token_lists: list[list[int]], max_length: int, stride: int | None = None) -> list[Window]:
    """Sliding windows over each document's tokens; every token after the first is a target once."""
    stride = max_length if stride is None else stride
    if max_length < 2 or not 1 <= stride <= max_length:
        raise ValueError(f"max_length must be >= 2 and 1 <= stride <= max_length, got {max_length} and {stride}")
    out = []
    for toks in token_lists:
        if len(toks) < 2:
            continue
        scored = 1  # tokens[0] is never a target
        start = 0
        while scored < len(toks):
            end = min(start + max_length, len(toks))
            out.append(Window(torch.tensor(toks[start:end]), scored - start))
            scored = end
            if end == len(toks):
                break
            start = max(start + stride, end - max_length + 1) if stride < max_length else end - 1
            start = min(start, end - 1)
    return out


def _batches(wins: list[Window], batch_size: int):
    for i in range(0, len(wins), batch_size):
        part = wins[i:i + batch_size]
        L = max(len(w.ids) for w in part)
        ids = torch.zeros(len(part), L, dtype=torch.long)
        mask = torch.zeros(len(part), L, dtype=torch.long)
        targets = torch.zeros(len(part), L, dtype=torch.bool)  # position t predicts token t + 1
        for r, w in enumerate(part):
            n = len(w.ids)
            ids[r, :n], mask[r, :n] = w.ids, 1
            targets[r, w.score_from - 1:n - 1] = True
        yield ids, mask, targets


@torch.no_grad()
def text_metrics(model, wins: list[Window], batch_size: int = 8) -> dict:
    """Full-model and circuit next-token loss and their KL over the windows (see the module notes)."""
    if not wins:
        raise ValueError("no window to score: every document has fewer than 2 tokens")
    if model.ablation == "interchange":
        raise ValueError("free-text eval has no corrupted text for interchange ablation: use ablation 'zero' or "
                         "'mean' (--ablation)")
    if model.ablation == "mean" and model.mean_states is None:
        model.set_mean_states(model.compute_mean_states([(i.to(model.device), m.to(model.device))
                                                         for i, m, _ in _batches(wins, batch_size)]))
    totals = {"loss_full": 0.0, "loss_circuit": 0.0, "kl": 0.0}
    n = 0
    for ids, mask, targets in _batches(wins, batch_size):
        ids, mask, targets = ids.to(model.device), mask.to(model.device), targets.to(model.device)
        labels = ids[:, 1:][targets[:, :-1]]
        full = model.full_forward(ids, mask, select=targets).logits.float()
        circ = model(ids, mask, select=targets).logits.float()
        totals["loss_full"] += F.cross_entropy(full, labels, reduction="sum").item()
        totals["loss_circuit"] += F.cross_entropy(circ, labels, reduction="sum").item()
        totals["kl"] += kl_divergence(full, circ).sum().item()
        n += labels.numel()
    return {**{k: v / n for k, v in totals.items()}, "tokens": n, "windows": len(wins)}


def evaluate_text(model, tokenizer, source, max_length: int = 512, stride: int | None = None,
                  batch_size: int = 8) -> dict:
    """Read ``source``, tokenize each document, and score it (``text_metrics``)."""
    docs = read_documents(source)
    toks = [tokenizer(d)["input_ids"] for d in docs]
    return {**text_metrics(model, windows(toks, max_length, stride), batch_size), "documents": len(docs)}
