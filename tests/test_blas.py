"""``edgeprune.blas.update``: a batch of products into a strided slice, through MKL or torch's fallback."""

import pytest
import torch

from edgeprune import blas


def _operands(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    P, W, R, D, start, k = 6, 9, 4, 5, 2, 5
    buffer = torch.randn(P, W, D, generator=gen, dtype=dtype)  # position-major, like dL/ds's buffer
    grads = torch.randn(R, P, D, generator=gen, dtype=dtype)  # reader-major, like the mix's output gradients
    a = torch.randn(k, R, generator=gen, dtype=dtype)
    return buffer, grads.transpose(0, 1), a, slice(start, start + k)


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("through_mkl", [True, False])
def test_update_writes_the_slice_and_nothing_else(beta, through_mkl, monkeypatch):
    if through_mkl and not blas.available():
        pytest.skip("no MKL batch GEMM in this torch build")
    if not through_mkl:
        monkeypatch.setattr(blas, "_batch", False)
    buffer, b, a, rows = _operands()
    expected = buffer.clone()
    expected[:, rows] = torch.bmm(a.expand(b.shape[0], *a.shape), b) + beta * buffer[:, rows]
    out = buffer[:, rows]
    assert not out.is_contiguous()  # the case torch's own baddbmm_ runs one product at a time
    blas.update(out, a, b, beta=beta)
    torch.testing.assert_close(buffer, expected)
    assert torch.equal(buffer[:, :rows.start], expected[:, :rows.start])  # the other rows untouched, bit for bit
    assert torch.equal(buffer[:, rows.stop:], expected[:, rows.stop:])


def test_update_outside_mkl_falls_back_to_torch():
    buffer, b, a, rows = _operands(torch.float64)  # MKL's sgemm is fp32 only
    expected = buffer[:, rows] + torch.bmm(a.expand(b.shape[0], *a.shape), b)
    blas.update(buffer[:, rows], a, b)
    torch.testing.assert_close(buffer[:, rows], expected)


def test_update_refuses_operands_that_do_not_fit():
    buffer, b, a, rows = _operands()
    with pytest.raises(ValueError, match="do not fit"):
        blas.update(buffer[:, rows], a[:, :2], b)
    with pytest.raises(ValueError, match="do not fit"):
        blas.update(buffer[:, rows], a, b[:3])


@pytest.mark.parametrize("R", [1, 4])
def test_update_passes_one_column_and_many_column_masks_to_mkl(R, monkeypatch):
    """The read-out's masks are one column, (W, 1), whose column stride PyTorch leaves arbitrary: they
    go through MKL's batch too, not torch's loop of small products."""
    if not blas.available():
        pytest.skip("no MKL batch GEMM in this torch build")
    gen = torch.Generator().manual_seed(1)
    P, W, D = 5, 7, 6
    buffer = torch.zeros(P, W + 2, D)
    a = torch.rand(R, W, generator=gen).T.contiguous()  # (W, R), as mixing passes z^T
    b = torch.randn(R, P, D, generator=gen).transpose(0, 1)
    monkeypatch.setattr(torch.Tensor, "baddbmm_", lambda *args, **kw: pytest.fail("fell back to torch's loop"))
    blas.update(buffer[:, :W], a, b, beta=0.0)
    torch.testing.assert_close(buffer[:, :W], torch.bmm(a.expand(P, W, R), b))
    assert not buffer[:, W:].any()


def test_update_leaves_other_devices_and_empty_batches_to_torch(monkeypatch):
    """Operands off the CPU never reach MKL (their pointers are not host memory), nor an empty batch:
    those go to ``torch.baddbmm_`` and its own checks."""
    monkeypatch.setattr(blas, "_call", lambda *args: pytest.fail("passed to MKL"))
    buffer, b, a, rows = _operands()
    try:
        blas.update(buffer[:, rows], a, b.to("meta"))
    except (RuntimeError, NotImplementedError):
        pass  # torch's own refusal of mixed devices, where it refuses them
    empty = torch.zeros(0, 5, 5)
    blas.update(empty, a, torch.zeros(0, a.shape[1], 5))
    assert empty.shape == (0, 5, 5)
