"""``threshold_to_sparsity`` with tied log_alpha values (issue 19, item 4).

Masks that got no gradient from the fit move in lockstep under the sparsity term, so after pruning
a Tracr model large groups of edges share one log_alpha. A threshold keeps or drops a tied group
whole; the count it keeps must be the achievable count nearest to the target, not the far side of
the group (bisection used to return 31 edges where 10 were achievable, and 12 where 5 were)."""

import pytest
import torch

from edgeprune.circuit import threshold_to_sparsity


def achievable_counts(la: torch.Tensor) -> list[int]:
    """Every count a threshold 'log_alpha > t' can keep, by brute force over t."""
    return sorted({int((la > v).sum()) for v in la.tolist()} | {la.numel()})


def test_tied_group_above_the_target_is_dropped_when_the_lower_count_is_nearer():
    la = torch.cat([torch.full((10,), 4.0), torch.full((21,), 1.5), torch.full((69,), -2.0)])
    t = threshold_to_sparsity(la, sparsity=1 - 12 / 100)  # target 12: 10 (distance 2) beats 31 (19)
    assert int(t.kept.sum()) == 10 and t.kept[:10].all() and t.target_kept == 12
    assert t.kept.equal(la > t.log_alpha)


def test_tied_group_below_the_target_is_kept_when_the_higher_count_is_nearer():
    la = torch.cat([torch.full((5,), 3.0), torch.full((7,), 0.25), torch.full((88,), -6.0)])
    t = threshold_to_sparsity(la, sparsity=1 - 11 / 100)  # target 11: 12 (distance 1) beats 5 (6)
    assert int(t.kept.sum()) == 12 and t.kept[:12].all()


def test_equal_distance_keeps_the_larger_count():
    la = torch.cat([torch.full((4,), 2.0), torch.full((4,), 1.0), torch.full((4,), 0.0)])
    assert int(threshold_to_sparsity(la, sparsity=1 - 6 / 12).kept.sum()) == 8


def test_all_tied_keeps_everything_or_nothing():
    la = torch.full((30,), 0.7)
    assert int(threshold_to_sparsity(la, sparsity=0.2).kept.sum()) == 30
    assert int(threshold_to_sparsity(la, sparsity=0.9).kept.sum()) == 0


def test_adjacent_float32_values_still_split():
    a = torch.tensor(1.0)
    b = torch.nextafter(a, torch.tensor(0.0))
    la = torch.cat([a.repeat(3), b.repeat(5)])
    t = threshold_to_sparsity(la, sparsity=1 - 3 / 8)
    assert int(t.kept.sum()) == 3 and t.kept.equal(la > t.log_alpha)


@pytest.mark.parametrize("seed", range(40))
def test_random_tied_groups_give_the_nearest_achievable_count(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(5, 120, (1,), generator=g))
    levels = torch.randn(4, generator=g) * 3
    la = torch.cat([levels[torch.randint(0, 4, (n,), generator=g)], torch.randn(3, generator=g)])
    target = int(torch.randint(0, la.numel() + 1, (1,), generator=g))
    t = threshold_to_sparsity(la, sparsity=1 - target / la.numel())
    got = int(t.kept.sum())
    counts = achievable_counts(la)
    assert got in counts and abs(got - target) == min(abs(c - target) for c in counts)
    assert t.kept.equal(la > t.log_alpha)
