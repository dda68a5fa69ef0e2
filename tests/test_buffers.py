"""Buffers kept from step to step (``edgeprune.buffers``): reused only when nothing else views them."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import build, token_batch
from edgeprune import EdgeModel, buffers

needs_use_count = pytest.mark.skipif(getattr(torch._C, "_storage_Use_Count", None) is None,
                                     reason="this torch does not expose storage use counts: nothing is kept")


@needs_use_count
def test_a_free_buffer_is_reused_and_a_viewed_one_is_not():
    buffers.clear()
    a = buffers.take("t", (4, 5), torch.float32, "cpu")
    a.fill_(7.0)
    b = buffers.take("t", (4, 5), torch.float32, "cpu")  # a is still alive: a new buffer
    assert b.data_ptr() != a.data_ptr() and bool((a == 7.0).all())
    kept = b.data_ptr()
    del a, b
    c = buffers.take("t", (2, 3), torch.float32, "cpu")  # free now, and large enough: reused
    assert c.data_ptr() == kept
    d = buffers.take("u", (2, 3), torch.float32, "cpu")  # another name, another buffer
    assert d.data_ptr() != kept
    del c, d
    buffers.clear("u")  # lets "u" go, keeps "t"
    assert buffers.take("t", (20,), torch.float32, "cpu").data_ptr() == kept
    assert buffers.take("t", (100,), torch.float32, "cpu").shape == (100,)  # too small: a larger one
    buffers.clear()


@needs_use_count
def test_states_a_forward_returns_survive_the_next_forward():
    """Zero ablation in fp32 returns the masked forward's states as a view of its buffer: the next
    forward must not write over them."""
    model = EdgeModel.from_hf(build("llama", seed=3), ablation="zero")
    a, b = token_batch(2, 6, seed=1), token_batch(2, 6, seed=2)
    first = model(a, return_states=True).states
    kept = first.clone()
    model(b, return_states=True)
    assert torch.equal(first, kept)


@needs_use_count
def test_mask_gradients_repeat_exactly_across_steps_with_kept_buffers():
    """A, B, A: the third step's mask gradients equal the first's bit for bit (no stale buffer data)."""
    model = EdgeModel.from_hf(build("gpt2", seed=2))
    a, b = token_batch(3, 7, seed=1), token_batch(3, 7, seed=2)

    def grads(ids):
        z = torch.full((model.edge_masks.n,), 0.5, requires_grad=True)
        out = model(ids, corrupted_input_ids=ids.flip(0), edge_values=z).logits.float()
        (out.logsumexp(-1) * torch.linspace(0.5, 2.0, ids.shape[1])).sum().backward()
        return z.grad

    first = grads(a)
    grads(b)
    assert torch.equal(grads(a), first)
    assert first.abs().sum() > 0


def test_huge_pages_are_asked_for_unless_the_environment_says_otherwise(monkeypatch):
    monkeypatch.delenv(buffers.HUGE_PAGES, raising=False)
    buffers.use_huge_pages()
    assert os.environ[buffers.HUGE_PAGES] == "1"
    monkeypatch.setenv(buffers.HUGE_PAGES, "0")  # the user's choice stands
    buffers.use_huge_pages()
    assert os.environ[buffers.HUGE_PAGES] == "0"


def test_the_cli_asks_for_huge_pages_before_it_runs_a_command(monkeypatch, tmp_path, capsys):
    from edgeprune.cli import main
    monkeypatch.delenv(buffers.HUGE_PAGES, raising=False)
    assert main(["export", str(tmp_path / "no-such-run"), "-o", str(tmp_path / "edges.json")]) == 2
    assert "no-such-run" in capsys.readouterr().err
    assert os.environ[buffers.HUGE_PAGES] == "1"


def test_glibc_keeps_its_freed_heap_unless_the_environment_says_otherwise(monkeypatch):
    """``keep_freed_heap`` sets glibc's trim and mmap thresholds (mallopt) where nothing in the
    environment chose them: not with any of glibc's ``MALLOC_*`` thresholds set (bench/step.py's
    memory runs set one), nor with ``EDGEPRUNE_KEEP_HEAP=0``."""
    for name in buffers.HEAP_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(buffers.KEEP_HEAP, "0")
    assert buffers.keep_freed_heap() is False
    monkeypatch.delenv(buffers.KEEP_HEAP)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert buffers.keep_freed_heap() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        assert buffers.keep_freed_heap() is False  # not glibc: nothing to set
    else:
        assert buffers.keep_freed_heap() is True


_REUSE = """
import resource, sys, torch
from edgeprune import buffers
if sys.argv[1] == "kept" and not buffers.keep_freed_heap():
    sys.exit(3)
faults = []
for _ in range(16):  # a layer's large temporary, made and freed again and again, as the mix's are
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 << 20)  # 64 MiB, touched
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del t
print(*faults)
"""


def _faults(policy: str) -> list[int] | None:
    env = {k: v for k, v in os.environ.items() if k not in buffers.HEAP_ENV and k not in (buffers.KEEP_HEAP,
                                                                                           buffers.HUGE_PAGES)}
    proc = subprocess.run([sys.executable, "-c", _REUSE, policy], capture_output=True, text=True, env=env)
    if proc.returncode == 3:
        return None
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [int(x) for x in proc.stdout.split()]


def test_a_kept_heap_reuses_freed_large_blocks_where_glibc_unmaps_them():
    """glibc mmaps blocks of 32 MiB and more and unmaps them when freed: every new one faults and is zeroed
    page by page. With ``keep_freed_heap`` they come from the heap, and once it has grown to the loop's
    needs (a few rounds: small allocations split freed blocks) a new block reuses freed pages."""
    kept = _faults("kept")
    if kept is None:
        pytest.skip("not glibc: keep_freed_heap sets nothing")
    pages = (64 << 20) // 4096
    assert sum(kept[-4:]) < pages // 100, kept  # steady state: no page faulted again
    default = _faults("default")
    # glibc's own: faulted every time (page by page, or per 2 MiB where the kernel's THP is "always")
    assert all(f >= (64 << 20) // (2 << 20) for f in default[-4:]), default
