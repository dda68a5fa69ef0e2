"""Tasks for compiled Tracr models: every input of the program's task length, exhaustively.

Each example is one input sequence (BOS first). The loss positions are the real-token positions
1..n: Tracr writes its output at the position of each input token (not the next one). Targets are
the compiled model's own outputs (the output-space index of the categorical value; 0 for numerical
outputs, whose loss is the squared error of the output dim). The corrupted input, used only under
interchange ablation, is another input of the same length (a fixed derangement of the list).
The same examples serve as train, validation and test: the task is the whole input space.
"""

from __future__ import annotations

import torch

from .jsonl import Example


def tracr_examples(tracr_model, length: int | None = None) -> list[Example]:
    """All inputs of ``length`` real tokens (default: the artifact's task length) as Examples."""
    inputs = tracr_model.all_inputs(length)
    with torch.no_grad():
        ids = tracr_model.encode(inputs)  # (N, 1 + n)
        outputs = tracr_model(ids)  # (N, 1 + n, n_out)
    n = ids.shape[1] - 1
    positions = list(range(1, n + 1))
    if tracr_model.output_kind == "categorical":
        targets = outputs[:, 1:].argmax(-1).tolist()
    else:
        targets = [[0] * n for _ in inputs]
    shift = len(inputs) // 2 + 1  # a derangement: example i is corrupted with input i + shift
    examples = []
    for i, seq in enumerate(inputs):
        j = (i + shift) % len(inputs)
        examples.append(Example(
            input_ids=ids[i].tolist(), corrupted_input_ids=ids[j].tolist(), loss_positions=positions,
            target_ids=targets[i], corrupted_target_ids=targets[j], split="train", line=i + 1,
            extra={"input": list(seq)}))
    return examples
