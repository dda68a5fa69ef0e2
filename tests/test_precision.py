"""Half-precision weights prune with fp32 masks and an fp32 mix."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import STORIES, build, require_shared, token_batch
from edgeprune import EdgeModel
from edgeprune.config import from_dict
from edgeprune.prune import prune

TASK = Path(__file__).resolve().parents[1] / "data" / "tasks" / "stories_names.jsonl"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_prune_with_half_precision_weights_keeps_masks_fp32(dtype, tmp_path):
    require_shared(STORIES)
    cfg = from_dict({
        "model": {"name_or_path": str(STORIES), "device": "cpu", "dtype": dtype},
        "data": {"path": str(TASK)},
        "prune": {"edge_target": 0.8, "steps": 4, "warmup_steps": 2, "batch_size": 4, "lr_masks": 1.0},
        "run": {"output_dir": str(tmp_path / "run"), "eval_every": 0, "log_every": 1, "eval_batches": 1},
    }).validate()
    result = prune(cfg, progress=False)
    assert result.finished
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    masks = load_file(str(tmp_path / "run" / "masks.safetensors"))["edge_log_alpha"]
    assert masks.dtype == torch.float32
    assert result.history[-1]["edges_sparsity"] > result.history[0]["edges_sparsity"]


def test_bf16_mask_gradients_are_close_to_fp32():
    ids, corrupted = token_batch(3, 12, seed=1), token_batch(3, 12, seed=2)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = EdgeModel.from_hf(build("llama", num_hidden_layers=3).to(dtype))
        with torch.no_grad():
            model.edge_masks.log_alpha.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(0))
        out = model(ids, corrupted_input_ids=corrupted).logits
        (out.float().log_softmax(-1)[..., :5] ** 2).mean().backward()
        assert model.edge_masks.log_alpha.grad.dtype == torch.float32
        grads[dtype] = model.edge_masks.log_alpha.grad
    a, b = grads[torch.float32], grads[torch.bfloat16]
    assert (a - b).norm() <= 0.1 * a.norm()
