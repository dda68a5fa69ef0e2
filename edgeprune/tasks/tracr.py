"""Tasks for compiled Tracr models: the program's own input set at its task length.

Each example is one input sequence (BOS first). The inputs are, in this order of preference,
- the sequences given explicitly (``inputs``, e.g. from a file read by ``read_inputs_file``),
- a file of token sequences in the artifact folder, ``inputs.json`` (format: ``read_inputs_file``),
- the program's own input set: the inputs of the task length in the artifact's
  ``reference_outputs.json`` (a program such as ``sort_unique`` is defined only on sequences of
  distinct tokens, and its compile script writes only those),
- every sequence over the vocabulary (an artifact without reference outputs).
The loss positions are the real-token positions 1..n whose compiled output is defined (a ``null``
in the reference outputs is skipped): Tracr writes its output at the position of each input token,
not the next one. Targets are the compiled model's own outputs (the output-space index of the
categorical value; 0 for numerical outputs, whose loss is the squared error of the output dim).
The corrupted input, used only under interchange ablation, is another input of the same length (a
fixed derangement of the list). The same examples serve as train, validation and test: the task
is the whole input set.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .jsonl import Example

INPUTS_FILE = "inputs.json"  # optional, in the artifact folder: the program's input set, chosen by the user


def tracr_examples(tracr_model, length: int | None = None, inputs: list | None = None) -> list[Example]:
    """The task's Examples (see the module docstring); ``length`` defaults to the artifact's task length."""
    defined = None
    if inputs is not None:
        inputs = [tuple(s) for s in inputs]
        if not inputs:
            raise ValueError(f"no input sequences given for {tracr_model.program!r}")
    else:
        inputs, defined = reference_inputs(tracr_model, length)
    with torch.no_grad():
        ids = tracr_model.encode(inputs)  # (N, 1 + n); one length, vocabulary checked
        outputs = tracr_model(ids)  # (N, 1 + n, n_out)
    n = ids.shape[1] - 1
    if tracr_model.output_kind == "categorical":
        targets = outputs[:, 1:].argmax(-1).tolist()
    else:
        targets = [[0] * n for _ in inputs]
    shift = len(inputs) // 2 + 1  # a derangement: example i is corrupted with input i + shift
    examples = []
    for i, seq in enumerate(inputs):
        j = (i + shift) % len(inputs)
        positions = [p for p in range(1, n + 1) if defined is None or defined[i][p - 1]]
        if not positions:
            continue
        examples.append(Example(
            input_ids=ids[i].tolist(), corrupted_input_ids=ids[j].tolist(), loss_positions=positions,
            target_ids=[targets[i][p - 1] for p in positions],
            corrupted_target_ids=[targets[j][p - 1] for p in positions], split="train", line=i + 1,
            extra={"input": list(seq)}))
    if not examples:
        raise ValueError(f"{tracr_model.program!r}: no input has a defined output at length {n}")
    return examples


def reference_inputs(tracr_model, length: int | None = None) -> tuple[list[tuple], list[list[bool]] | None]:
    """(inputs of ``length`` in the artifact's reference outputs, per input which positions have a
    defined output); every sequence over the vocabulary (and None) when the artifact has none."""
    length = tracr_model.task_length if length is None else length
    own = None if tracr_model.path is None else Path(tracr_model.path) / INPUTS_FILE
    if own is not None and own.is_file():
        seqs = [s for s in read_inputs_file(own, tracr_model.vocab) if len(s) == length]
        if not seqs:
            raise ValueError(f"{own}: no input of length {length} (the task length of {tracr_model.program!r})")
        return seqs, None
    path = None if tracr_model.path is None else Path(tracr_model.path) / "reference_outputs.json"
    if path is None or not path.is_file():
        return tracr_model.all_inputs(length), None
    cases = [c for c in tracr_model.reference_outputs() if len(c.get("input", ())) == length]
    if not cases:
        raise ValueError(f"{path}: no input of length {length} (the task length of {tracr_model.program!r})")
    for c in cases:
        if not isinstance(c.get("output"), list) or len(c["output"]) != length:
            raise ValueError(f"{path}: case {c.get('input')!r}: 'output' must be a list of {length} values")
    return [tuple(c["input"]) for c in cases], [[v is not None for v in c["output"]] for c in cases]


def read_inputs_file(path, vocab: list) -> list[tuple]:
    """Token sequences from a file: a JSON list of sequences, or JSONL with one sequence per line
    (a list, or an object with an ``input`` list). Tokens must be in ``vocab``; errors name the line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"inputs file {path} does not exist") from None
    try:  # the whole file as one JSON list; else one JSON value per line
        whole = json.loads(text)
        rows = [(1, r) for r in whole] if isinstance(whole, list) else None
    except json.JSONDecodeError:
        rows = None
    if rows is None:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    out, allowed = [], set(map(str, vocab))
    for number, row in rows:
        seq = row.get("input") if isinstance(row, dict) else row
        if not isinstance(seq, list) or not seq:
            raise ValueError(f"{path}:{number}: expected a non-empty list of tokens, got {row!r}")
        bad = [t for t in seq if str(t) not in allowed]
        if bad:
            raise ValueError(f"{path}:{number}: tokens {bad!r} are not in the vocabulary {vocab!r}")
        by_str = {str(v): v for v in vocab}
        out.append(tuple(by_str[str(t)] for t in seq))
    if not out:
        raise ValueError(f"{path}: no input sequences")
    return out
