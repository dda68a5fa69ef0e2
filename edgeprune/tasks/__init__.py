"""Tasks: clean/corrupted prompt pairs, tokenized and batched for pruning and evaluation."""

from .jsonl import (SPLITS, Batch, Example, TaskFormatError, batches, collate, pad_token_id_for,
                    read_jsonl_task, to_hf_dataset)

__all__ = ["SPLITS", "Batch", "Example", "TaskFormatError", "batches", "collate",
           "pad_token_id_for", "read_jsonl_task", "to_hf_dataset"]
