"""Hard-concrete masks."""

import math

import pytest
import torch

from edgeprune.masks import HardConcreteMasks, deterministic, prob_nonzero, sample


def test_initial_masks_are_exactly_one():
    m = HardConcreteMasks(1000).eval()
    assert torch.equal(m(), torch.ones(1000))
    assert m.expected_sparsity().item() < 1e-4


def test_samples_lie_in_unit_interval_with_exact_zeros_and_ones():
    gen = torch.Generator().manual_seed(0)
    z = sample(torch.zeros(200_000), gen)
    assert z.min() == 0 and z.max() == 1
    assert ((z > 0) & (z < 1)).any()


def test_prob_nonzero_matches_empirical_rate():
    gen = torch.Generator().manual_seed(0)
    for la in (-2.0, 0.0, 1.5):
        z = sample(torch.full((200_000,), la), gen)
        assert abs((z > 0).float().mean().item() - prob_nonzero(torch.tensor(la)).item()) < 5e-3


def test_deterministic_values():
    assert deterministic(torch.tensor(0.0)).item() == pytest.approx(0.5)
    assert deterministic(torch.tensor(-10.0)).item() == 0.0
    assert deterministic(torch.tensor(math.log(11.0) + 1e-4)).item() == 1.0


def test_training_mode_samples_and_reset_restores_ones():
    m = HardConcreteMasks(50).train()
    with torch.no_grad():
        m.log_alpha.fill_(0.0)
    assert not torch.equal(m(), m())
    m.set_values(torch.zeros(50))
    assert torch.equal(m(), torch.zeros(50))
    m.reset()
    assert torch.equal(m.eval()(), torch.ones(50))


def test_set_values_rejects_wrong_size():
    with pytest.raises(ValueError, match=r"shape \(50,\)"):
        HardConcreteMasks(50).set_values(torch.ones(49))
