import json

import pytest
import torch

from edgeprune.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint


def test_nested_state_round_trips(tmp_path):
    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.sum().backward()
    opt.step()
    state = {"step": 3, "opt": opt.state_dict(), "rng": torch.get_rng_state(), "names": ["a", None, 1.5]}
    save_checkpoint(state, tmp_path / "ckpt")
    back = load_checkpoint(tmp_path / "ckpt")
    assert back["step"] == 3 and back["names"] == ["a", None, 1.5]
    assert torch.equal(back["rng"], state["rng"])
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_no_pickle_on_disk(tmp_path):
    save_checkpoint({"x": torch.ones(2)}, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["state.json", "state.safetensors"]
    json.loads((tmp_path / "ckpt" / "state.json").read_text())


def test_interrupted_swap_keeps_previous_checkpoint(tmp_path):
    save_checkpoint({"step": 1}, tmp_path / "ckpt")
    # a kill between the two renames leaves only the previous copy
    (tmp_path / "ckpt").rename(tmp_path / "ckpt.old")
    found = find_checkpoint(tmp_path / "ckpt")
    assert found == tmp_path / "ckpt.old" and load_checkpoint(found)["step"] == 1


def test_damaged_checkpoint_errors_name_file(tmp_path):
    save_checkpoint({"x": torch.ones(2)}, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="state.safetensors"):
        load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match="state.json"):
        load_checkpoint(tmp_path / "ckpt")
