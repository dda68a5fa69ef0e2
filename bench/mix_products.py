"""The rate of the mix's own products alone, against a large GEMM's: where the backward's floor lies.

    python bench/mix_products.py                     # SmolLM2-135M's shapes at 32 x 64, 2 threads
    python bench/mix_products.py --shape 8x32 --d 768 --writers 158,101 --readers 37

The mix's backward makes three passes over the differences of the writers before each reader group
(the rebuild of the norms' inputs, dL/dz, dL/ds; ``edgeprune/mixing.py``), each a product with the
group's few readers on one side: per position, (R, k) x (k, D) and (R, D) x (D, k); over the batch,
(k, R) x (R, P x D). This prints each one's GFLOP/s alone (outputs kept, inputs warm), in the layouts
``mixing`` uses and in the others one might try, beside one large GEMM of the same machine (the
MLP's, which HF's step is made of), and the rate each pass would reach if it only had to stream its
operands from memory once (the floor of a memory-bound pass; above MKL's rates, the passes are bound
by the products, not by memory). Each figure is the median of ``--repeats`` runs; nothing here is
asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from edgeprune import blas, buffers  # noqa: E402
from step import parse_shape  # noqa: E402


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated positive integers."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers")
    return values


def shape(text: str) -> tuple[int, int]:
    """argparse type: B x T, both positive."""
    try:
        b, t = parse_shape(text.lower())
    except ValueError:
        b = t = 0
    if b < 1 or t < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BxT, e.g. 32x64")
    return b, t


def rate(flops: float, fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return flops / statistics.median(times) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=shape, default="32x64", help="B x T")
    ap.add_argument("--d", type=int, default=576, help="hidden size (SmolLM2-135M: 576, GPT-2 small: 768)")
    ap.add_argument("--writers", type=positive_ints, default="221,101",
                    help="comma-separated k: writers a group reads")
    ap.add_argument("--readers", type=positive_ints, default="32,16,64",
                    help="comma-separated R: readers a pass serves (SmolLM2: 16 a layer, 32 a pair)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    for flag in ("d", "threads", "repeats"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} {getattr(args, flag)}: expected a positive integer")
    buffers.tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    B, T = args.shape
    P, D = B * T, args.d
    ks = args.writers
    W = max(ks) + 1
    diffs = torch.randn(P, W, D)  # the position-major buffer of mixing.WriterStates
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, P = {P} positions, D = {D}; GFLOP/s, "
          f"median of {args.repeats}")
    a, b = torch.randn(P, 3 * D), torch.randn(3 * D, D)
    print(f"  a large GEMM ({P}, {3 * D}) x ({3 * D}, {D}): "
          f"{rate(2 * P * 3 * D * D, lambda: torch.mm(a, b), args.repeats):.0f}")
    for R in args.readers:
        for k in ks:
            flops = 2 * P * R * k * D
            d = diffs[:, :k]
            z = torch.randn(R, k).expand(P, R, k).contiguous()
            go = torch.randn(R, P, D)  # reader-major, as the norms' backward writes it
            mix, mix_t = torch.empty(P, R, D), torch.empty(P, D, R)
            dz, dz_t = torch.empty(P, R, k), torch.empty(P, k, R)
            grad = torch.randn(k, P * D)
            zt, g2 = z[0].T, go.view(R, P * D)

            def dl_ds(rows: int = 64):
                for r in range(0, k, rows):
                    grad[r:r + rows].addmm_(zt[r:r + rows], g2)
            cases = [("mix", lambda: torch.bmm(z, d, out=mix)),
                     ("(transposed", lambda: torch.bmm(d.transpose(1, 2), z.transpose(1, 2), out=mix_t)),
                     ("dL/dz", lambda: torch.bmm(go.transpose(0, 1), d.transpose(1, 2), out=dz)),
                     ("(swapped", lambda: torch.bmm(d, go.permute(1, 2, 0), out=dz_t)),
                     ("dL/ds in blocks of 64", dl_ds),
                     ("(whole", lambda: grad.addmm_(zt, g2)),
                     # the memory floor: a pass that only streamed its operands once (the differences read: the
                     # mix, its rebuild, dL/dz; the gradient rows read and written: dL/ds), at this pass's FLOPs
                     ("(floor: the differences read once", lambda: d.sum()),
                     ("(the gradient rows read and written once", lambda: grad.add_(1.0))]
            row = [f"R={R:3d} k={k:3d}:"]
            row += [f"{name} {rate(flops, fn, args.repeats):.0f}" + (")" if name[0] == "(" else "")
                    for name, fn in cases]
            for c in (8, 64):  # positions side by side: (k, c x D) blocks, a layout mixing does not use
                n = P // c
                chunked = diffs[: n * c].view(n, c, W, D)[:, :, :k].permute(0, 2, 1, 3).reshape(n, k, c * D)
                out = torch.empty(n, R, c * D)
                fn = lambda zc=z[:n], x=chunked, o=out: torch.bmm(zc, x, out=o)  # noqa: E731
                row.append(f"(mix, {c} positions a block {rate(2 * n * c * R * k * D, fn, args.repeats):.0f})")
                del chunked, out
            print("  " + " ".join(row), flush=True)
    others(P, D, diffs, ks[0], args.repeats)
    return 0


def others(P: int, D: int, diffs: torch.Tensor, k: int, repeats: int) -> None:
    """The variants measured and not taken (docs/speed-log.md, the eighth session)."""
    R = 32
    print("  not taken:")
    # dL/ds of two groups at once: one K = 64 update against two K = 32 updates of the same rows
    grad, z2, go2 = torch.randn(k, P * D), torch.randn(2 * R, k), torch.randn(2 * R, P * D)

    def two():
        for h in (slice(0, R), slice(R, 2 * R)):
            for r in range(0, k, 64):
                grad[r:r + 64].addmm_(z2[h, r:r + 64].T, go2[h])

    def one():
        for r in range(0, k, 64):
            grad[r:r + 64].addmm_(z2[:, r:r + 64].T, go2)
    flops = 2 * k * 2 * R * P * D
    print(f"    dL/ds of two groups: one K=64 update {rate(flops, one, repeats):.0f}, two K=32 updates "
          f"{rate(flops, two, repeats):.0f}")
    grad_layouts(P, D, k, R, repeats)
    # one position's product through oneDNN (PyTorch's mkldnn linear) against MKL's mm
    x, w = torch.randn(R, k), torch.randn(D, k)
    flops = 2 * R * k * D
    line = f"    one position's ({R}, {k}) x ({k}, {D}): MKL {rate(flops, lambda: torch.mm(x, w.T), 50):.0f}"
    try:
        onednn = torch.ops.mkldnn._linear_pointwise
        line += f", oneDNN {rate(flops, lambda: onednn(x, w, None, 'none', [], ''), 50):.0f}"
    except (AttributeError, RuntimeError):
        line += ", oneDNN: not in this build"
    print(line)
    # the one-writer mix (a pair over the embeddings alone) as a broadcast multiply against the bmm
    one_z, one_d = torch.rand(R, 1), diffs[:, :1]
    zz = one_z.expand(P, R, 1).contiguous()
    flops = P * R * D
    print(f"    a one-writer mix: bmm {rate(flops, lambda: torch.bmm(zz, one_d), repeats):.1f}, broadcast multiply "
          f"{rate(flops, lambda: torch.mul(one_z.unsqueeze(0), one_d), repeats):.1f}")
    # a layer's K/V readers' input gradients (3 heads of 64 each): one bmm against a loop of mm
    n, dh = 3, 64
    dy, w = torch.randn(n, P, dh), torch.randn(D, n * dh).view(D, n, dh).permute(1, 2, 0)
    out = torch.empty(n, P, D)

    def loop():
        for h in range(n):
            torch.mm(dy[h], w[h], out=out[h])
    flops = 2 * n * P * dh * D
    print(f"    K/V input gradients ({n} heads): bmm {rate(flops, lambda: torch.bmm(dy, w, out=out), repeats):.0f}, "
          f"a loop of mm {rate(flops, loop, repeats):.0f}")


def grad_layouts(P: int, D: int, k: int, R: int, repeats: int) -> None:
    """dL/ds of one group, (k, R) x (R, P x D), with the gradient buffer cold as in the step (a 300 MB
    write between runs), in the layouts measured in the twelfth session (``mixing`` uses position-major
    through MKL's batch on CPU, writer-major elsewhere), beside a plain read-modify-write of the same
    rows: the writer-major GEMM is not bound by the buffer's traffic."""
    flush = torch.empty(300 << 18)

    def cold(fn):
        def run():
            flush.fill_(1.0)
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        run()
        return statistics.median(run() for _ in range(repeats))
    flops, N = 2 * k * R * P * D, P * D
    zt, go = torch.rand(k, R), torch.randn(R, N)
    by_position = go.view(R, P, D).transpose(0, 1)

    def on(shape, update, view=lambda t: t):  # a fresh zeroed buffer of ``shape``, gone after its timing
        buffer = view(torch.zeros(shape))
        return cold(lambda: update(buffer))
    secs = {"writer-major": on((k, N), lambda g: g.addmm_(zt, go)),
            "in column blocks of 8192": on((k, N), lambda g: [g[:, c:c + 8192].addmm_(zt, go[:, c:c + 8192])
                                                              for c in range(0, N, 8192)])}
    stream = on((k, N), lambda g: g.add_(1.0))
    # position-major, the writers' slice of a (P, W, D) buffer: one (k, R) x (R, D) product per position into
    # its contiguous block, through MKL's batch GEMM (what mixing does on CPU) and through torch's baddbmm_,
    # which runs a strided output's products one by one
    writers_slice = lambda g: g[:, :k]  # noqa: E731
    secs["position-major, MKL batch"] = on((P, k + 20, D), lambda g: blas.update(g, zt, by_position), writers_slice)
    secs["position-major, torch.baddbmm_"] = on((P, k + 20, D), lambda g: g.baddbmm_(zt.expand(P, k, R), by_position),
                                                writers_slice)
    secs["writer-minor"] = on((N, k), lambda g: g.addmm_(go.T, zt.T))
    print(f"    dL/ds of one group (k={k}, R={R}), its buffer cold: " +
          ", ".join(f"{name} {flops / s / 1e9:.0f}" for name, s in secs.items()) +
          f"; a read-modify-write of those rows alone {k * N * 8 / stream / 1e9:.0f} GB/s "
          f"({stream * 1e3:.1f} ms against the update's {secs['writer-major'] * 1e3:.1f})")


if __name__ == "__main__":
    raise SystemExit(main())
