"""The writer mix: each reader's input as a mask-weighted sum of the writers before it.

    x_r = c_r + sum_w z_rw s_w + (1 - z_rw) s~_w  =  c_r + sum_w s~_w + sum_w z_rw (s_w - s~_w)

(c_r: the layer constants before r; s~: the ablated states, corrupted / mean / zero). The second
form is what runs: the ablated sum is a running fp32 sum shared by every reader at that depth, and
the masked part is one GEMM over the differences d_w = s_w - s~_w. With every mask 0 the mix is
exactly the fp32 sum of the ablated states; with every mask 1 it is the clean sum up to one fp32
rounding of each difference (~1e-7 relative, far inside the 1e-5 logit bar; for bf16/fp16 models
the difference of two half-precision values is exact in fp32, so the mix is the fp32 sum of their
clean states, as if accumulated directly).

How it stays lean and fast (DESIGN.md section 3):

- ``WriterStates`` keeps the differences of one forward once, in a single fp32 buffer, filled
  group by group (embeddings, a layer's heads, a layer's MLP) as the forward runs. The buffer is
  position-major, (B, T, W, D): at every position the writers form a (W, D) matrix, and a reader
  group's mix is one batched product ``z @ d[p, :n]`` over the positions p, whose operands stay in
  cache. (Writer-major (W, B, T, D) makes it one skinny GEMM with N = B x T x D, which MKL runs
  2-3x slower on CPU: measured in ``bench/step.py``.) No per-layer concatenation, no second pass
  for the ablated states, and the ablated states themselves are not needed after the forward
  (the backward uses only ``d``). A group's output is position-major too, (B, T, R, D), and reaches
  the families as an (R, B, T, D) view: their norm runs on it whole, and the per-head projections
  read it with a row stride, so no transpose is ever copied in the forward.
- Gradients to the states go through a side channel: each write returns an autograd *token* that
  every later mix takes as an input; the mixes' backward adds ``z^T @ dL/dx`` into one fp32
  gradient buffer (on CPU with MKL position-major like the states, each mix's update one MKL batch
  of per-position products into its writers' slice, ``blas.update``; elsewhere writer-major, one
  GEMM per mix), and a write's backward (which autograd runs only after every mix that read it)
  hands its writers' slice to the writer's own backward. So states are stored once, never saved
  per mix, and their gradients accumulate in fp32. The first mix backward (the read-out's, over
  every writer) writes that buffer rather than adding to a zeroed one.
- At depth the mix is bound by memory traffic over the buffer, not by FLOPs (a reader group reads
  the differences of every earlier writer, forward and backward), so readers that read the same
  writers share one pass: a layer's MLP row rides on its Q/K/V mix (``split``: one product, one
  dL/dz and one dL/ds pass for both) and its own layer's heads come as a *range* mix added to it
  (``start``; ``model._masked_layer``). Layers go in groups (pairs by default) the same way: the
  first of a group also mixes the later layers' readers over the writers it reads (``carry``), and
  each later layer adds its partial mix to a range mix over the group's writers before it
  (``partial``).
- In a pruned circuit most writers feed no reader of a group (``live_writers``) and most masks are
  clamped (``needed_writers``): the mix, its rebuild, dL/dz and dL/ds then read or write only those
  writers, whose differences are gathered (one copy per run of consecutive writers) into a buffer kept
  from step to step (``scratch``): fresh, each such temporary's pages were zeroed by the kernel.
- ``recompute_saved``: the mix outputs are large, (R, B, T, D) fp32 with R readers (445 readers to
  158 writers in GPT-2 small), and the norm each reader applies would save them for backward.
  Inside this context such saved tensors are dropped and rebuilt from the mix when backward needs
  them (one more batched product), so saved activations stay O(writers x B x T x D).
- On CPU a lone layer's dense mix rebuilds its Q/K/V inputs in its own backward, chunk of examples by
  chunk, and forms dL/dz from the same chunk while its differences are in cache: the norm leaves the
  x-term of its input gradient to the mix (``DeferredInput``, ``WriterStates._fused_grad``).
- dL/dz is formed per example in fp32 and summed over the batch in fp64 (then, under torchrun,
  over processes by ``reduce``): the sum does not depend on how a batch is split, so several
  processes on slices of a batch give the masks a single process gives, not merely close ones.
- The mix accumulates in fp32, over fp32 differences: for half-precision models this buffer is
  twice the size of their states (the ablated states from the reference pass stay in the model's
  dtype), the price of exact differences and one fp32 product per reader group.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.autograd.function import once_differentiable

from . import blas, buffers
from .graph import Graph


def per_position(z: torch.Tensor, span_ids: torch.Tensor | None, P: int) -> torch.Tensor:
    """The masks each position's mix uses, (P, R, n): z (R, n) shared by every position (a view), or
    position-aware z (S, R, n) picked by the span of each position (``span_ids`` (P,) long)."""
    if z.dim() == 2:  # materialised: CPU bmm runs a stride-0 batch 1.3-1.8x slower (bench/step.py)
        return z.expand(P, *z.shape).contiguous()
    if span_ids is None:
        raise ValueError("position-aware masks (one set per span) need the span of every position (span_ids)")
    return z.index_select(0, span_ids)


SPARSE_GRAD = 1 / 2  # dL/ds: update only the live writers' rows when at most this fraction is live
SPARSE_MIX = 1 / 4  # the mix, dL/dz: gather the writers' differences when at most this fraction is wanted
# below this many fp32 values per example in a slice, counting costs more than it saves (1 << 20 for a
# batch of 8). Per example, not per batch: the choice then does not depend on how a batch is split over
# processes, so a torchrun run computes exactly what one process computes (a gathered product may
# round differently in the last bit, and AdamW's step amplifies that)
SPARSE_MIN = 1 << 17
# a dense mix on CPU completes its Q/K/V readers' input gradients itself (``DeferredInput``) from this many
# fp32 values of differences per example (like SPARSE_MIN: the choice does not depend on the batch size), in
# chunks of whole examples of about FUSE_CHUNK bytes of differences, which stay in cache between the rebuild of
# the chunk's inputs and its dL/dz
FUSE_MIN = SPARSE_MIN
FUSE_CHUNK = 16 << 20


def _few_writers(wanted: torch.Tensor, example_width: int, fraction: float) -> torch.Tensor | None:
    """(m,) long: the columns (writers) of ``wanted`` ((R, n) or (S, R, n) bool) any entry of which is
    True, if at most ``fraction`` of them are; else None (every writer). CPU only: counting them is
    a device sync, and GPUs are not bound by this memory traffic; nor for slices of fewer than
    ``SPARSE_MIN`` values per example (``example_width`` = T x D times the writers: toy and Tracr
    models)."""
    if wanted.device.type != "cpu" or example_width * wanted.shape[-1] < SPARSE_MIN:
        return None
    columns = wanted.reshape(-1, wanted.shape[-1]).any(0)
    if int(columns.sum()) > fraction * columns.numel():
        return None
    return columns.nonzero()[:, 0]


def live_writers(z: torch.Tensor, example_width: int) -> torch.Tensor | None:
    """The writers some reader's mask in z is nonzero for, where at most ``SPARSE_GRAD`` of them are
    (``_few_writers``). The others' terms are exactly 0 in the mix and in dL/ds, so they can be left
    out: a pruned circuit's masks are mostly exactly 0 (at 98% edge sparsity most writers feed no
    reader of a layer). dL/ds then reads and writes only the live rows; the mix gathers the live
    writers' differences when at most ``SPARSE_MIX`` are live (the gather copies rows slower than a
    product reads them, so it pays only when few are live: 1/8, 1/4, 1/3 and 1/2 measured on SmolLM2
    with a real 98% circuit's masks, 1/4 the best)."""
    return _few_writers(z.detach().ne(0), example_width, SPARSE_GRAD)


def needed_writers(support: torch.Tensor, example_width: int) -> torch.Tensor | None:
    """The writers dL/dz is computed for: those some mask in ``support`` (bool like z: the masks whose
    dL/dz the caller needs) reads, where at most ``SPARSE_MIX`` of them are (``_few_writers``). The
    others' dL/dz is left 0: a clamped hard-concrete mask passes no gradient on."""
    return _few_writers(support, example_width, SPARSE_MIX)


def gathers(live: torch.Tensor | None, k: int) -> bool:
    """Whether a mix over k writers of which ``live`` (``live_writers``) are live gathers their differences."""
    return live is not None and live.numel() <= SPARSE_MIX * k


def position_rows(base: torch.Tensor | None, pos: slice) -> torch.Tensor | None:
    """A mix's base ((B, T, D), or (D,) / (1, 1, D) / None, the same at every position) at the positions
    ``pos`` of the flattened batch: (c, D) or the broadcast base itself."""
    if base is None or base.dim() < 3 or base.shape[0] * base.shape[1] == 1:
        return base
    return base.reshape(-1, base.shape[-1])[pos]


def mix_values(z: torch.Tensor, diffs: torch.Tensor, base: torch.Tensor | None,
               span_ids: torch.Tensor | None = None, live: torch.Tensor | None = None,
               pool: str | None = None) -> torch.Tensor:
    """The mix without autograd: base + z @ diffs, position by position.

    z (R, n) fp32, or (S, R, n) per span with ``span_ids`` (P,) long the span of each position; diffs
    (P, n, D) fp32 (P = B x T positions, a writer slice of the buffer); base: fp32 (B, T, D),
    (1, 1, D) or (D,) (ablated sum + layer constants) or None; live: ``live_writers`` (the
    other writers' masks are all 0: their terms are left out where few are live); pool: gather them
    into a buffer kept under this name (``gather``). -> (P, R, D) fp32.
    """
    if gathers(live, z.shape[-1]):
        z, diffs = z[..., live], gather(diffs, live, pool)
    out = torch.bmm(per_position(z, span_ids, diffs.shape[0]), diffs)  # one (R, n) x (n, D) product per position
    if base is None:
        return out
    return out.add_(base if base.dim() == 1 else base.reshape(-1, 1, base.shape[-1]))  # z = 0: exactly the base


# the sparse paths' temporaries (gathers, dL/ds's live rows) into one kept buffer (``scratch``); False: fresh
# tensors, as before (bench/step.py --vs-fresh-scratch)
KEEP_SCRATCH = True


def scratch(shape: tuple[int, ...], pool: str | None, device: torch.device) -> torch.Tensor:
    """An uninitialised fp32 tensor for one of the sparse paths' temporaries: with ``pool`` (a pooled
    forward's), a view of the buffer kept under ``pool + ".sparse"`` (``edgeprune.buffers``; reused once
    the product that read it is done, and never while a view of it is alive). Such a temporary -- the
    differences of tens of live writers gathered for a product, or their rows of dL/ds -- is hundreds
    of MB at 32 x 64, and fresh, each of its pages is zeroed by the kernel on first touch, at every mix,
    rebuild, dL/dz and dL/ds of a pruned circuit's step: the (m, R) x (R, B·T·D) product of dL/ds's
    live rows took 3.5x as long into a fresh tensor as into a kept one at SmolLM2's 32 x 64. The buffer
    grows to the largest of them, at most ``SPARSE_GRAD`` of the writer states' size, where the sparse
    paths run (pruned masks; a one-reader mix's dL/dz gathers nothing, see ``_grad_z``). It lives for
    one step's backward (``_take_grad`` lets it go), not beside the next forward, which holds the
    step's peak."""
    if pool is None or not KEEP_SCRATCH:
        return torch.empty(shape, device=device)
    return buffers.take(f"{pool}.sparse", shape, torch.float32, device)


def gather(diffs: torch.Tensor, writers: torch.Tensor, pool: str | None) -> torch.Tensor:
    """diffs[:, writers], (P, m, D): the differences of a few writers side by side for one product, into
    ``scratch`` (CPU: the sparse paths run only there; without ``pool`` a fresh tensor)."""
    if diffs.device.type != "cpu":
        return diffs[:, writers]
    out = scratch((diffs.shape[0], writers.numel(), diffs.shape[-1]), pool, diffs.device)
    # one strided copy per run of consecutive writers: faster than torch's index kernels (64 of SmolLM2's 301
    # writers at 32 x 64: 43 ms into a fresh tensor, 28 ms into a kept one, against 53 ms by indexing)
    for first, i, stop in _runs(writers.tolist()):
        out[:, i:i + stop - first].copy_(diffs[:, first:stop])
    return out


# dL/ds's update into the writer-major buffer (CPU without MKL, or GRAD_BY_POSITION off), (k, R) x (R, B·T·D),
# in blocks of at most this many writers on CPU (0: one product), from
# GRAD_BLOCK_MIN values per writer and example (T x D; per example, like SPARSE_MIN, so that torchrun's processes
# choose alike). MKL runs that product with few reader rows (R 16-64) and hundreds of writers at a fraction of its
# rate: on a 2-core AMD EPYC, (281, 32) x (32, 2048·576) at 43 GFLOP/s whole and 125 in blocks of 64 rows (the
# SmolLM2 32 x 64 step 1.13x faster); with one thread every block over 64 rows is slow. At 8 x 32 (T x D 18,432
# on SmolLM2) the blocks read 0.93-1.03x the whole product in the step (bench/step.py --vs mixing.GRAD_ROWS=0).
# Each row sums over the same readers (a BLAS may round another block size differently in the last bit).
GRAD_ROWS = 64
GRAD_BLOCK_MIN = 1 << 15
# dL/ds's buffer position-major on CPU where MKL's batch GEMM is reachable (``_add_grad``); False: writer-major.
# SmolLM2's dense backward 1.04-1.07x faster (8x32, 32x64), GPT-2 small's 1.05-1.10x, a pruned circuit's the same
# (bench/step.py --vs mixing.GRAD_BY_POSITION=False)
GRAD_BY_POSITION = True


def row_blocks(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, add: bool, rows: int = 0) -> None:
    """out (k, N) = a (k, R) @ b (R, N), or += with ``add``; in blocks of ``rows`` rows of out (0: one product)."""
    step = rows or max(1, out.shape[0])
    for r in range(0, out.shape[0], step):
        block = slice(r, r + step)
        out[block].addmm_(a[block], b) if add else torch.mm(a[block], b, out=out[block])


def reader_view(x: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """A (P, R, D) mix output as the (R, B, T, D) reader inputs the families take (a view, no copy)."""
    return x.view(B, T, x.shape[1], x.shape[2]).permute(2, 0, 1, 3)


class StateSink:
    """Where a plain (unmasked) pass writes its writer states, writer-major: ``buffer`` (W, B, T, D)
    gets s_w - s~_w, or s_w itself without ``ablated`` (in the buffer's dtype; fp32 keeps differences of
    half-precision states exact). ``ablated`` (W, B, T, D), broadcastable (W, 1, 1, D), or ``buffer``
    itself: then each group's differences overwrite the ablated states in place, so a corrupted pass
    into a sink and a clean pass subtracting it leave s - s~ in one buffer, with no second buffer and
    no separate subtraction pass (``baselines/ig_inputs.py``). ``model.full_forward(..., sink=)``."""

    def __init__(self, buffer: torch.Tensor, ablated: torch.Tensor | None = None):
        self.buffer, self.ablated = buffer, ablated

    def write(self, states: torch.Tensor, start: int) -> None:
        rows = slice(start, start + states.shape[0])
        with torch.no_grad():
            if self.ablated is None:
                self.buffer[rows].copy_(states)
            else:  # in the buffer's dtype: two half-precision states differ exactly in fp32
                torch.sub(states.to(self.buffer.dtype), self.ablated[rows], out=self.buffer[rows])


class UniformMix:
    """The writer mix with every edge's mask at one value alpha, as a plain pass reads it.

    With z_rw = alpha for every edge the mix of the module notes needs no per-reader product:

        x_r = c_r + sum_w s~_w + alpha sum_w (s_w - s~_w) = (1 - alpha) R~_n + alpha R_n,

    R_n the pass's own residual stream before reader r's n writers (their states + the layer constants)
    and R~_n the ablated one (the ablated states + the same constants). Given to a plain pass
    (``EdgeModel.full_forward(path=)``), every reader reads ``read(R_n, n)``: the edge-masked model at
    z = alpha * 1 (EAP-IG along the masks, ``baselines/ig_masks.py``) at the cost of the plain model.
    ``ablated``: n -> R~_n ((B, T, D), broadcastable (1, 1, D), or None: 0) for every reader's n
    (``ablated_stream``)."""

    def __init__(self, alpha: float, ablated: dict):
        self.alpha, self.ablated = float(alpha), ablated

    def read(self, resid: torch.Tensor, n: int) -> torch.Tensor:
        base = self.ablated[n]
        return resid * self.alpha if base is None else torch.lerp(base, resid, self.alpha)


def ablated_stream(graph: Graph, ablated: torch.Tensor | None, constant) -> dict:
    """n -> R~_n, the ablated residual stream before the first n writers (fp32), at every writer block's
    boundary: the ablated states summed in graph order ((W, B, T, D) or (W, 1, 1, D); None: zero
    ablation), with each layer's constant (``constant(layer)``: (D,) or None) added after its heads, as
    the plain pass adds it. None where it is 0 (zero ablation, before any constant)."""
    out, acc = {}, None
    for blk in graph.writer_blocks:
        out[blk.start] = acc
        if ablated is not None:
            part = ablated[blk.start:blk.stop].float().sum(0)
            acc = part if acc is None else acc + part
        if blk.kind == "heads":
            const = constant(blk.layer)
            if const is not None:
                acc = const.float() if acc is None else acc + const.float()
    out[graph.num_writers] = acc
    return out


class WriterStates:
    """The writer states of one forward, kept once as differences d_w = s_w - s~_w.

    ``buffer``: (B, T, W, D), position-major (see the module notes); fp32, or the model's dtype
    where it only stores states (the reference pass: no ablated states). ``states()`` gives it as
    (W, B, T, D). ``ablated``: the ablated states s~, (W, B, T, D), a broadcastable (W, 1, 1, D)
    (mean), or None (zero ablation; then d = s). ``write`` stores a writer group at its place in
    graph order and returns its autograd token (None when no gradient flows to it); ``mix`` reads
    the first n writers. ``grad`` is the fp32 dL/ds buffer, position-major (B x T, W, D) on CPU with
    MKL, else writer-major (W, B x T, D) (``_add_grad``), that the mixes' backward fills (allocated,
    zeroed, at the first backward). ``seal`` ends the forward: the ablated states are let go, and
    later writes (activation checkpointing recomputes layers in the backward) leave the buffer as it
    is, since they would write the same values.
    """

    def __init__(self, n_writers: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 ablated: torch.Tensor | None = None, reduce=None, span_ids: torch.Tensor | None = None,
                 pool: str | None = None, grad_support: torch.Tensor | None = None):
        """``pool``: keep ``buffer`` from step to step under this name (``edgeprune.buffers``; the
        masked forward's "mix"), and take the dL/ds buffer from ``buffers.SWAP``. ``grad_support``: (R_all, W) bool like the model's dense masks, the
        masks whose dL/dz is needed (a clamp passes no gradient through the others), or None: all."""
        B, T, D = shape
        self.shape = (B, T, D)
        # (P,) long: the span of each position, for position-aware masks z (S, R, n); None: z (R, n)
        self.span_ids = None if span_ids is None else span_ids.reshape(B * T).to(device=device, dtype=torch.long)
        self.pool = pool
        self.buffer = torch.empty((B, T, n_writers, D), dtype=dtype, device=device) if pool is None else \
            buffers.take(f"{pool}.states", (B, T, n_writers, D), dtype, device)
        self.flat = self.buffer.view(B * T, n_writers, D)  # (P, W, D)
        self._example_width = T * D  # values per writer and example (the sparse paths' threshold, SPARSE_MIN)
        self.grad_support = grad_support
        self.reduce = reduce  # in-place sum of an fp64 tensor over processes, or None
        self.ablated = None if ablated is None else ablated.detach()
        self.grad: torch.Tensor | None = None  # (P, W, D) position-major or (W, P, D) writer-major
        self.grad_position_major = False  # the layout of ``grad``, fixed when the first backward allocates it
        self._taken = n_writers  # rows from here on were handed to their writers' backward
        self._pending = 0  # writes whose gradient is not handed over yet (their tokens' backward)
        self.sealed = False
        # n -> fp32 sum of s~ over writers < n; (start, stop) -> over writers start..stop-1 (range_base)
        self._sums: dict = {0: None}

    def write(self, states: torch.Tensor, start: int) -> torch.Tensor | None:
        """Store a (g, B, T, D) writer group as writers start..start+g; its token if gradients flow to it."""
        rows = slice(start, start + states.shape[0])
        if torch.is_grad_enabled() and states.requires_grad:
            self._pending += 1
            return _Write.apply(states, self, rows)
        self._store(states.detach(), rows)
        return None

    def _store(self, states: torch.Tensor, rows: slice) -> None:
        if self.sealed:
            return
        target = self.buffer[:, :, rows].permute(2, 0, 1, 3)  # (g, B, T, D) view
        with torch.no_grad():
            if self.ablated is None:
                target.copy_(states)
            else:  # exact for half-precision states: the difference of two of them fits fp32
                torch.sub(states.float(), self.ablated[rows].float(), out=target)

    def seal(self) -> None:
        self.sealed, self.ablated = True, None

    def states(self, ablated: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """(W, B, T, D) the states themselves in ``dtype``, s = d + s~ (give the ablated states the store had).
        Without ablated states and in the buffer's dtype this is a view of the buffer."""
        view = self.buffer.permute(2, 0, 1, 3)
        return (view if ablated is None else view + ablated.float()).to(dtype)

    def diffs(self, n: int, start: int = 0) -> torch.Tensor:
        """(P, n - start, D): the stored differences of writers start..n-1 at every position."""
        return self.flat[:, start:n]

    def values(self, z: torch.Tensor, const: torch.Tensor | None, start: int = 0) -> torch.Tensor:
        """The mix of ``mix`` without autograd, (P, R, D) position-major: z over writers start..start + k - 1
        (``start`` > 0: a range mix, whose base is those writers' ablated states alone)."""
        stop = start + z.shape[-1]
        base = self.base(stop, const) if start == 0 else self.range_base(start, stop, const)
        return mix_values(z, self.diffs(stop, start), base, self.span_ids, live_writers(z, self._example_width),
                          self.pool)

    def rebuild(self, z: torch.Tensor, const: torch.Tensor | None) -> torch.Tensor:
        """The mix of ``mix`` again, without autograd (for ``recompute_saved``), as (R, B, T, D): z over
        the writers before its readers, as the forward mixed it. (A group's layers: ``GroupRebuild``.)"""
        return reader_view(self.values(z, const), *self.shape[:2])

    def range_base(self, start: int, stop: int, const: torch.Tensor | None) -> torch.Tensor | None:
        """The ablated states of writers start..stop-1 summed in fp32 (+ const): the base of a range mix.
        Kept, like ``ablated_sum``: activation checkpointing mixes again after ``seal``."""
        if (start, stop) not in self._sums:
            self._sums[start, stop] = None if self.ablated is None else self.ablated[start:stop].float().sum(0)
        part = self._sums[start, stop]
        if const is None:
            return part
        return const if part is None else part + const

    def ablated_sum(self, n: int) -> torch.Tensor | None:
        """fp32 sum of the ablated states of writers 0..n-1 ((B, T, D), (1, 1, D) or None for zero)."""
        if n not in self._sums:
            if self.ablated is None:
                self._sums[n] = None
            else:
                prev = max(k for k in self._sums if isinstance(k, int) and k < n)
                part = self.ablated[prev:n].float().sum(0)
                self._sums[n] = part if self._sums[prev] is None else self._sums[prev] + part
        return self._sums[n]

    def mix(self, z: torch.Tensor, const: torch.Tensor | None, tokens: list[torch.Tensor], start: int = 0,
            split: tuple[int, ...] | None = None, rows: slice | None = None, carry: int = 0,
            partial: torch.Tensor | None = None, deferred: "DeferredInput | None" = None):
        """sum_w z[:, w] s_w + (1 - z[:, w]) s~_w (+ const) over writers start..start + z.shape[-1] - 1.

        z: (R, k) fp32, or (S, R, k) position-aware (each position uses its span's row); const: (D,) fp32
        layer constants or None; tokens: those of the groups among these writers. ``start`` > 0 mixes a
        range of writers (its base: their ablated states alone, ``range_base``), to be added to an
        earlier mix of the writers before it. Returns (R, B, T, D) fp32, a view of a position-major
        (B, T, R, D) tensor; with ``split`` (reader counts summing to R) one such view per part, as
        separate autograd outputs (the backward takes their gradients together: one pass over the
        states for every part, ``model._masked_layer``). Gradients flow to z and to the states. ``rows``:
        the readers' rows of the model's masks, to look up which of z's gradients are needed
        (``grad_support``).

        Groups of layers share a pass over the states (``model._masked_layer``): the last ``carry``
        parts of ``split`` are the later layers' readers, mixed over these writers and returned as
        they are, (P, r, D) position-major, the *partial* mixes; a later layer's ``mix`` over the
        writers after these (``start``) takes its own as ``partial`` and adds it (gradients flow back
        to it).

        ``deferred``: the first part's readers may leave the x-term of their input gradient to this mix's
        backward (``DeferredInput``; armed here when the mix is one that can take it).
        """
        stop = start + z.shape[-1]
        split = (z.shape[-2],) if split is None else tuple(split)
        if torch.is_grad_enabled() and (z.requires_grad or tokens or (partial is not None and partial.requires_grad)):
            base = self.base(stop, const) if start == 0 else self.range_base(start, stop, const)
            needed = None
            if self.grad_support is not None and rows is not None and z.requires_grad:
                needed = needed_writers(self.grad_support[..., rows, start:stop], self._example_width)
            outs = _Mix.apply(z, self, base, start, split, needed, partial, deferred, *tokens)
        else:
            out = self.values(z, const, start)
            if partial is not None:
                out.add_(partial)
            outs = out.split(split, dim=1)
        views = tuple(o if i >= len(outs) - carry else reader_view(o, *self.shape[:2]) for i, o in enumerate(outs))
        return views[0] if len(views) == 1 else views

    def base(self, n: int, const: torch.Tensor | None) -> torch.Tensor | None:
        """What every reader after writer n-1 sees whatever its masks: ablated sum + constants."""
        asum = self.ablated_sum(n)
        if const is None:
            return asum
        return const if asum is None else asum + const

    def fusable(self, z: torch.Tensor, live: torch.Tensor | None, needed: torch.Tensor | None) -> bool:
        """Whether the backward of a mix of z (R, k) can complete its readers' input gradients itself
        (``DeferredInput``): dense (no sparse path), shared masks, on CPU, and not a toy's small slices."""
        k = z.shape[-1]
        return (self.buffer.device.type == "cpu" and z.dim() == 2 and needed is None and not gathers(live, k)
                and self._example_width * k >= FUSE_MIN)

    def _fused_grad(self, grad_out: torch.Tensor, z: torch.Tensor, base: torch.Tensor | None, start: int,
                    deferred: "DeferredInput", coef: torch.Tensor, want_z: bool) -> torch.Tensor | None:
        """Completes the first ``deferred.rows`` rows of grad_out (R, P, D), reader-major, with coef * x
        (coef (rows, P, 1), x their inputs: this mix's values again), and with ``want_z`` returns dL/dz
        (R, k) as ``_grad_z`` does. Both run over chunks of whole examples: a chunk's inputs are rebuilt
        and its dL/dz formed while its differences are in cache, so the backward reads them once where
        a whole rebuild and ``_grad_z`` read them twice (and x is never written out whole)."""
        B, T, D = self.shape
        R, k = z.shape
        rows = deferred.rows
        diffs = self.diffs(start + k, start)
        per_example = torch.empty((B, R, k), dtype=torch.float32, device=z.device) if want_z else None
        step = max(1, FUSE_CHUNK // (T * k * D * 4))
        for e0 in range(0, B, step):
            e1 = min(B, e0 + step)
            pos = slice(e0 * T, e1 * T)
            x = mix_values(z[:rows], diffs[pos], position_rows(base, pos))  # (c, rows, D)
            grad_out[:rows, pos].addcmul_(x.transpose(0, 1), coef[:, pos])
            if per_example is not None:  # as _grad_z: per example in fp32
                products = torch.bmm(grad_out[:, pos].transpose(0, 1), diffs[pos].transpose(1, 2))  # (c, R, k)
                torch.sum(products.view(e1 - e0, T, R, k), 1, out=per_example[e0:e1])
        return None if per_example is None else self._reduced(per_example.sum(0, dtype=torch.float64))

    def _grad_z(self, grad_out: torch.Tensor, n: int, n_spans: int | None = None, start: int = 0,
                needed: torch.Tensor | None = None) -> torch.Tensor:
        """dL/dz (R, n - start) fp32 from grad_out (R, P, D) reader-major: per example in fp32, summed over
        examples in fp64. Position-aware (``n_spans``): (S, R, n - start), each span's positions summed
        in fp64. ``needed`` (``needed_writers``): only those columns are computed, the others are 0."""
        B, T, _ = self.shape
        R, k = grad_out.shape[0], n - start
        columns = None if R == 1 else needed  # the writers the product reads (None: every one)
        if R == 1:
            # one reader (the read-out's mix, over every writer): a matrix-vector product per position reads each
            # difference once, faster than gathering even a fifth of them (SmolLM2 at 32 x 64: 25 ms against 56,
            # and 375 ms in the step, where the gather's fresh 290 MB are cold)
            per_position = torch.bmm(self.diffs(n, start), grad_out.permute(1, 2, 0)).view(-1, 1, k)  # (P, 1, k)
        else:
            diffs = self.diffs(n, start) if columns is None else gather(self.diffs(n, start), columns, self.pool)
            per_position = torch.bmm(grad_out.transpose(0, 1), diffs.transpose(1, 2))  # (P, R, m)
        m = per_position.shape[-1]
        if n_spans is None:
            part = per_position.view(B, T, R, m).sum(1).sum(0, dtype=torch.float64)
        else:
            part = torch.zeros((n_spans, R, m), dtype=torch.float64, device=per_position.device)
            part.index_add_(0, self.span_ids, per_position.double())
        total = part
        if needed is not None:  # the other columns are left 0 (made by the one-reader product, or not at all)
            total = part.new_zeros((*part.shape[:-1], k))
            total[..., needed] = part if columns is not None else part[..., needed]
        return self._reduced(total)

    def _reduced(self, total: torch.Tensor) -> torch.Tensor:
        """dL/dz summed over this process's examples (fp64), summed over processes (``reduce``), in fp32."""
        if self.reduce is not None:
            self.reduce(total)
        return total.float()

    def _add_grad(self, z: torch.Tensor, grad_out: torch.Tensor, start: int = 0,
                  live: torch.Tensor | None = None) -> None:
        """grad[start:start + k] += z^T @ grad_out at every position, for z (R, k), grad_out (R, P, D)
        reader-major, in fp32; with ``live`` (``live_writers``) only those rows (the others' masks
        are all 0). The first call that covers every writer (the read-out's, the first backward)
        writes the buffer instead of adding to a zeroed one.

        On CPU with MKL (``blas.available``) ``grad`` is position-major, (P, W, D), like the states: the
        update is one (k, R) x (R, D) product per position into that position's contiguous (k, D) block,
        all of them one MKL batch (``blas.update``), which streams the block through the cache where the
        writer-major GEMM below reads and writes its rows at a fraction of the memory's rate
        (``bench/mix_products.py``). Elsewhere it is writer-major, (W, P, D): a writer slice is one dense
        (k, P x D) block, and shared masks make the update one GEMM, (k, R) x (R, P x D)."""
        k, R = z.shape[-1], z.shape[-2]
        if start + k > self._taken:
            raise RuntimeError("a second backward through one edge-masked forward (retain_graph=True) is "
                               "not supported: run the forward again")
        P, W, D = self.flat.shape
        fresh = self.grad is None and start == 0 and k == W and live is None
        if self.grad is None:  # a pooled forward's: the bytes its corrupted states had (buffers.SWAP)
            self.grad_position_major = GRAD_BY_POSITION and self.buffer.device.type == "cpu" and blas.available()
            shape = (P, W, D) if self.grad_position_major else (W, P, D)
            self.grad = torch.empty(shape, dtype=torch.float32, device=self.buffer.device) \
                if self.pool is None else buffers.take(buffers.SWAP, shape, torch.float32, self.buffer.device)
            if not fresh:
                self.grad.zero_()
        if live is not None:
            z = z[..., live]
        if self.grad_position_major:
            self._add_grad_by_position(z, grad_out, start, live, fresh)
            return
        target = self.grad[start:start + k].view(k, P * D)
        blocks = GRAD_ROWS if target.device.type == "cpu" and self._example_width >= GRAD_BLOCK_MIN else 0
        if z.dim() == 3:  # position-aware: each position's own masks, one small product per position
            zt = per_position(z, self.span_ids, P).transpose(1, 2)  # (P, k, R)
            part = torch.bmm(zt, grad_out.transpose(0, 1)).transpose(0, 1).reshape(-1, P * D)
        elif live is None:  # straight into the block
            row_blocks(target, z.T, grad_out.reshape(R, P * D), not fresh, blocks)
            return
        else:  # the live rows' update, into the sparse paths' kept buffer (``scratch``)
            part = scratch((z.shape[-1], P * D), self.pool, target.device)
            row_blocks(part, z.T, grad_out.reshape(R, P * D), False, blocks)
        if live is not None:
            target.index_add_(0, live, part)
        else:
            target.copy_(part) if fresh else target.add_(part)

    def _add_grad_by_position(self, z: torch.Tensor, grad_out: torch.Tensor, start: int,
                              live: torch.Tensor | None, fresh: bool) -> None:
        """``_add_grad`` into the position-major buffer (P, W, D); z already cut to the live writers."""
        P = self.flat.shape[0]
        by_position = grad_out.transpose(0, 1)  # (P, R, D), each reader's row contiguous
        runs = [(start, 0, z.shape[-1])] if live is None else \
            [(start + a, i, i + b - a) for a, i, b in _runs(live.tolist())]  # (first writer, z column, z stop)
        if z.dim() == 3:  # position-aware: each position's own masks, one small product per position
            part = torch.bmm(per_position(z, self.span_ids, P).transpose(1, 2), by_position)  # (P, m, D)
            for first, i, j in runs:
                target = self.grad[:, first:first + j - i]
                target.copy_(part[:, i:j]) if fresh else target.add_(part[:, i:j])
            return
        zt = z.T.contiguous()  # (m, R)
        if live is None:
            blas.update(self.grad[:, start:start + zt.shape[0]], zt, by_position, beta=0.0 if fresh else 1.0)
            return
        # a pruned circuit's live writers come in many short runs: one product for all of them into the sparse
        # paths' kept buffer, then an add per run (a product per run is a batch of tiny ones: 0.89x the step)
        part = scratch((P, zt.shape[0], by_position.shape[-1]), self.pool, zt.device)
        blas.update(part, zt, by_position, beta=0.0)
        for first, i, j in runs:
            self.grad[:, first:first + j - i].add_(part[:, i:j])

    def _take_grad(self, rows: slice, dtype: torch.dtype) -> torch.Tensor | None:
        """The finished gradient of writers ``rows`` (no mix adds to them any more), (g, B, T, D) in
        ``dtype``: in fp32 a view of the buffer (those rows are not written again)."""
        self._taken = min(self._taken, rows.start)
        self._pending -= 1
        if self._pending == 0 and self.pool is not None:
            # the backward is done with the mix: its sparse paths' buffer (``scratch``) goes, so that it does
            # not sit beside the next step's forward, which holds the step's peak
            buffers.clear(f"{self.pool}.sparse")
        if self.grad is None:
            return None
        B, T, D = self.shape
        if self.grad_position_major:  # (g, B, T, D), a strided view of the (P, W, D) buffer
            return self.grad[:, rows].transpose(0, 1).unflatten(1, (B, T)).to(dtype)
        return self.grad[rows].view(rows.stop - rows.start, B, T, D).to(dtype)


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive values in sorted ``ids``: (first value, index of the first, one past the last value)."""
    out, j = [], 0
    while j < len(ids):
        k = j + 1
        while k < len(ids) and ids[k] == ids[k - 1] + 1:
            k += 1
        out.append((ids[j], j, ids[k - 1] + 1))
        j = k
    return out


class GroupRebuild:
    """The Q/K/V inputs of a group of layers again, for their norms' backward (``recompute_saved``),
    with one pass over the writers before the group where rebuilding each layer alone takes one each.

    The forward mixed every layer's readers of the group over those writers in one product (the
    first layer's ``mix`` with ``carry``), and each later layer added its rows of it (its partial) to
    its range mix over the group's writers before it. The backward rebuilds the deepest layers
    first: the first to rebuild makes the group's product again, the very product of the forward,
    and keeps it for the shallower layers (when the first layer rebuilds its inputs too); ``later`` adds a layer's
    rows to its range mix in the forward's order, and ``first`` takes the first layer's rows and
    lets the product go. Every rebuild is the forward's values bit for bit. z: every layer's rows
    over the writers before the group, (R, m) or position-aware (S, R, m); const: the constants that
    mix had; ``offsets``: where each layer's rows start in z (the first layer's at 0);
    ``first_rebuilds``: whether ``first`` will be called (else the product is not kept)."""

    def __init__(self, store: WriterStates, z: torch.Tensor, const: torch.Tensor | None,
                 offsets: tuple[int, ...], first_rebuilds: bool):
        self.store, self.z, self.const, self.offsets, self.keep = store, z, const, offsets, first_rebuilds
        self.product: torch.Tensor | None = None

    def _mix(self) -> torch.Tensor:
        return self.store.values(self.z, self.const)

    def first(self) -> torch.Tensor:
        """The first layer's inputs, (R1, B, T, D), inside the group's product (the forward's layout)."""
        product, self.product = self.product, None
        return reader_view(self._mix() if product is None else product, *self.store.shape[:2])

    def later(self, index: int, z: torch.Tensor, const: torch.Tensor | None) -> torch.Tensor:
        """The inputs of the group's layer ``index`` (> 0), (R_i, B, T, D): z its rows over the group's
        writers before it, const the group's own constants before it (the range mix's)."""
        product = self._mix() if self.product is None else self.product
        if self.keep:
            self.product = product
        rows = slice(self.offsets[index], self.offsets[index] + z.shape[-2])
        out = self.store.values(z, const, start=self.z.shape[-1]).add_(product[:, rows])
        return reader_view(out, *self.store.shape[:2])


class _Write(torch.autograd.Function):
    @staticmethod
    def forward(ctx, states, store, rows):
        store._store(states, rows)
        ctx.store, ctx.rows, ctx.dtype = store, rows, states.dtype
        return states.new_zeros(())

    @staticmethod
    @once_differentiable
    def backward(ctx, _):
        # autograd runs this after the backward of every mix that took the token: the rows are complete
        return ctx.store._take_grad(ctx.rows, ctx.dtype), None, None


class _Mix(torch.autograd.Function):
    """z (R, k) over writers start..start+k-1 (+ a carried partial mix (P, R, D) of the writers before)
    -> the mix (P, R, D), as one output per part of ``split``."""

    @staticmethod
    def forward(ctx, z, store, base, start, split, needed, partial, deferred, *tokens):
        ctx.save_for_backward(z)
        ctx.store, ctx.start, ctx.split, ctx.needed = store, start, split, needed
        ctx.live = live_writers(z, store._example_width)
        ctx.deferred, ctx.base = None, None
        if deferred is not None and store.fusable(z, ctx.live, needed):
            deferred.armed = True
            ctx.deferred, ctx.base = deferred, base
        out = mix_values(z, store.diffs(start + z.shape[-1], start), base, store.span_ids, ctx.live,
                         store.pool)  # (P, R, D)
        if partial is not None:  # the mix over the writers before ``start``, carried from the layer before
            out.add_(partial)
        return out.split(split, dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        (z,) = ctx.saved_tensors
        store, start = ctx.store, ctx.start
        go = _reader_major(grads, ctx.split)  # (R, P, D)
        stop = start + z.shape[-1]
        coef = None if ctx.deferred is None else ctx.deferred.take()
        if coef is not None:  # the norm left the x-term of its input gradient to this backward
            grad_z = store._fused_grad(go, z, ctx.base, start, ctx.deferred, coef, ctx.needs_input_grad[0])
        else:
            grad_z = store._grad_z(go, stop, z.shape[0] if z.dim() == 3 else None, start, ctx.needed) \
                if ctx.needs_input_grad[0] else None
        grad_partial = go.transpose(0, 1) if ctx.needs_input_grad[6] else None  # (P, R, D)
        n_tokens = len(ctx.needs_input_grad) - 8
        if n_tokens:
            store._add_grad(z, go, start, ctx.live)
        return (grad_z, None, None, None, None, None, grad_partial, None,
                *[z.new_zeros(()) for _ in range(n_tokens)])


def _reader_major(grads: tuple, split: tuple[int, ...]) -> torch.Tensor:
    """The parts' gradients ((P, r, D) each) side by side as one dense reader-major (R, P, D) tensor.
    The norms' backward lays the first part's gradient out reader-major in a buffer of the whole's
    width (``models.common._mix_width``): that buffer is then taken as it is, and only the other
    parts are copied in."""
    first = next(g for g in grads if g is not None)
    P, D, R = first.shape[0], first.shape[-1], sum(split)
    go = _whole(grads[0], R)
    taken = go is not None  # the first part already sits in it
    if go is None:
        go = first.new_empty((R, P, D))
    for i, (part, g) in enumerate(zip(go.split(split), grads)):
        if i == 0 and taken:
            continue
        part.zero_() if g is None else part.copy_(g.transpose(0, 1))
    return go


def _whole(g: torch.Tensor | None, R: int) -> torch.Tensor | None:
    """(R, P, D) over g's storage where g (P, r, D) is the transposed view of the first r rows of such
    a dense reader-major tensor, else None."""
    if g is None or g.storage_offset() != 0:
        return None
    P, r, D = g.shape
    if g.stride() != (D, P * D, 1) and not (r == R == 1 and g.is_contiguous()):
        return None
    if g.untyped_storage().nbytes() < R * P * D * g.element_size():
        return None
    return g.as_strided((R, P, D), (P * D, D, 1))


class DeferredInput:
    """The x-term of a reader input's gradient, left by the norm to the mix that made the input.

    A norm folded into its readers' projections (``models.common._NormProjection``) has the input
    gradient dx = g + coef * x: g and coef (one scalar per reader and position) come from its output
    gradient alone, x is its input, which the backward rebuilds from the mix (``recompute_saved``).
    Rebuilt whole, x (R x B x T x D fp32) is written out and read back, and the mix's dL/dz then reads
    the writers' differences a second time. When the mix is dense, on CPU (``WriterStates.fusable``:
    ``armed`` by its forward), the norm hands coef here instead (``deferred_input``, ``give``) and
    returns g; the mix's backward rebuilds x over chunks of examples and completes the gradient, and
    forms dL/dz over the same chunk while its differences are still in cache
    (``WriterStates._fused_grad``): one pass over the differences where two were made.

    rows: the readers of the mix's first part (its first ``rows`` rows of z). Only a layer that mixes
    alone defers (``EdgeModel._masked_layer``): a group's later layer needs its whole input for its
    range mix's dL/ds before the group's first layer is reached, so a group reads the differences
    twice in the backward anyway (the rebuild, then dL/dz), as it does without this."""

    def __init__(self, rows: int):
        self.rows = rows
        self.armed = False  # the mix's backward will complete the gradient
        self.claimed = False  # a norm has taken it (one term per input)
        self.coef: torch.Tensor | None = None

    def give(self, coef: torch.Tensor) -> None:
        """The norm's backward: coef (rows, P, 1), the multiplier of x in its input gradient."""
        self.coef = coef

    def take(self) -> torch.Tensor | None:
        coef, self.coef = self.coef, None
        return coef


_DEFERRED: list = []  # (storage pointer, DeferredInput) of the open recompute_saved blocks


def deferred_input(x: torch.Tensor) -> DeferredInput | None:
    """For a norm about to save its input x (R, B, T, D): the armed ``DeferredInput`` of the mix x is part
    0 of, to hand the x-term of its gradient to instead of saving x (claimed: once per input), or None."""
    if not _DEFERRED:
        return None
    ptr, deferred = _DEFERRED[-1]
    if deferred is None or not deferred.armed or deferred.claimed or x.shape[0] != deferred.rows \
            or x.untyped_storage().data_ptr() != ptr or x.storage_offset() != 0:
        return None
    deferred.claimed = True
    return deferred


class _SavedView:
    """A saved tensor that lived in a mix output: where it sat, to cut it out of the rebuilt mix."""

    def __init__(self, rebuilt, t: torch.Tensor):
        self.rebuilt, self.shape, self.stride, self.offset = rebuilt, t.shape, t.stride(), t.storage_offset()


class _Rebuilt:
    def __init__(self, rebuild, base_offset: int):
        self.rebuild, self.base_offset = rebuild, base_offset
        self.pending, self.value = 0, None

    def get(self, view: _SavedView) -> torch.Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = self.rebuild()
        value = self.value
        self.pending -= 1
        if self.pending <= 0:  # every saved view of it has been used: free it
            self.value = None
        return value.as_strided(view.shape, view.stride, view.offset - self.base_offset + value.storage_offset())


@contextmanager
def recompute_saved(x: torch.Tensor, rebuild, deferred: DeferredInput | None = None):
    """Inside this block, tensors autograd saves that live in ``x``'s storage are not kept.

    Backward rebuilds ``x`` with ``rebuild()`` (same shape and layout; once per backward, shared by
    every saved view of x) and cuts the saved views out of it. Other saved tensors are untouched.
    ``deferred``: the mix's ``DeferredInput``, offered to a norm of x inside the block (``deferred_input``).
    """
    if not torch.is_grad_enabled():
        yield
        return
    _DEFERRED.append((x.untyped_storage().data_ptr(), deferred))
    try:
        with _saved_views_rebuilt(x, rebuild):
            yield
    finally:
        _DEFERRED.pop()


@contextmanager
def _saved_views_rebuilt(x: torch.Tensor, rebuild):
    ptr, dtype = x.untyped_storage().data_ptr(), x.dtype
    rebuilt = _Rebuilt(rebuild, x.storage_offset())

    def pack(t):
        if t.dtype == dtype and t.untyped_storage().data_ptr() == ptr:
            rebuilt.pending += 1
            return _SavedView(rebuilt, t)
        return t

    def unpack(p):
        return p.rebuilt.get(p) if isinstance(p, _SavedView) else p

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def dense_masks(graph: Graph, edge_values: torch.Tensor, node_values: torch.Tensor | None,
                n_spans: int | None = None) -> torch.Tensor:
    """(readers, writers) fp32 matrix of effective masks; 0 where no edge exists. Position-aware
    (``n_spans`` S): edge_values (S * E,) span-major (span s's masks are ``[s * E, (s + 1) * E)``) give
    (S, readers, writers).

    edge_values: (E,) in graph edge order. node_values: (W,) per writer or None (shared by every
    span). A node mask multiplies every edge out of its writer: x_r = s~ + z_rw z_w (s_w - s~_w).
    """
    idx = graph.dense_index.to(edge_values.device)
    size = graph.num_readers * graph.num_writers
    if n_spans is not None:
        idx = (torch.arange(n_spans, device=idx.device)[:, None] * size + idx[None, :]).reshape(-1)
    flat = edge_values.new_zeros(size * (n_spans or 1)).index_put((idx,), edge_values)
    dense = flat.view(graph.num_readers, graph.num_writers) if n_spans is None else \
        flat.view(n_spans, graph.num_readers, graph.num_writers)
    if node_values is not None:
        dense = dense * node_values[None, :]
    return dense
