"""EAP and EAP-IG at one plain forward and backward per IG step (the "inputs" variant).

EAP-IG as Hanna et al. (2024) define it: integrate the metric's gradient along the straight path
from the corrupted *input* to the clean one, taken at the embeddings,

    e(alpha) = alpha * embed(clean) + (1 - alpha) * embed(corrupted),

and score every edge e = (w, r) with the writer's clean-minus-corrupted state:

    score_e = -<s_w - s~_w, mean_alpha dm/dx_r (e(alpha))>        (summed over batch, positions, d_model)

with ``dm/dx_r`` the gradient at reader r's own input (before its norm) in the *plain* model run on
e(alpha). Sign as ``attribution``: ``score_e`` estimates m(edge e ablated) - m(full). Completeness:
the scores sum to ~ m(corrupted input) - m(clean input), exactly in the limit of many steps.

What it costs. The writer states s (clean) and s~ (corrupted) do not depend on alpha: a no-grad pass
over the corrupted input writes s~ into one fp32 buffer, and a no-grad pass over the clean input
overwrites it in place with s - s~ (``mixing.StateSink``) and gives the reference logits. Then each
alpha is one plain forward and backward with *reader taps* (``edgeprune.taps``): every Q/K/V reader
of a layer gets its own stride-0 view of the residual, so the backward gives each reader its own
``dm/dx_r`` (norm and projection backward per reader; their forward runs once, as in HF). The taps
sum those over the alphas in one fp32 (readers, B, T, D) buffer, and one contraction per batch,
``(readers, B*T*D) @ (B*T*D, writers)`` per layer's readers and the writers before them (per example
in fp32, summed over examples in fp64), gives every edge's score. No edge-masked forward runs.

EAP is alpha = 1: the forward is the plain clean forward, which also gives the reference logits
and subtracts the clean states in place, so EAP costs one forward and backward plus a no-grad pass
over the corrupted input (none under zero or mean ablation). Both buffers, the differences and
the reader gradients, are reused from batch to batch (``edgeprune.buffers``). It is the same
quantity as the masks variant's ``-dm/dz (z = 1)`` (``attribution.path_gradient_scores``): at z = 1
the masked model's reader inputs are the plain model's and ``dm/dz_e = <dm/dx_r, s_w - s~_w>``.

The difference from EAP-IG on the masks (``attribution``, variant ``masks``): that variant moves
every edge mask together, z = alpha * 1, so its path runs through mixtures of clean and corrupted
*writer states* at every reader (each state on the path is a mix of states computed on the two
inputs), while this one runs the model on mixtures of the *inputs*, where every later state is the
model's own response to the interpolated embedding. Both start at the full model (alpha = 1) and
agree there (EAP); they end at the same place (every edge ablated = the model on the corrupted input,
under interchange ablation), so their scores sum to the same total, but they split it differently
between edges.

Ablations: EAP works under every ablation (s~ is the ablated state: corrupted, zero or the dataset
mean). The IG path needs an input to start from, so EAP-IG's inputs variant needs interchange
ablation; zero and mean ablation define ablated *states* with no input that produces them (zeroed
embeddings do not zero a head's output), and are refused. Position-aware masks get one score per
(edge, span): the contraction sums each span's positions apart. Clean and corrupted inputs must have
the same attention mask (every task batch does): the path interpolates tokens, not padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import buffers
from ..eval import kl_divergence
from ..graph import Graph
from ..mixing import StateSink
from ..model import EdgeModel
from ..taps import ReaderTaps

METRICS = ("logit_diff", "kl", "mse")


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric


def metric_at_positions(cur: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor, alt: torch.Tensor,
                        metric: str) -> torch.Tensor:
    """Scalar: the metric summed over N loss positions. cur, ref (N, V) circuit and full-model logits;
    targets, alt (N,) long: the target token and the full model's top alternative."""
    cur = cur.float()
    if metric == "logit_diff":
        return (cur.gather(1, targets[:, None]) - cur.gather(1, alt[:, None])).sum()
    if metric == "kl":
        return kl_divergence(ref, cur).sum()
    if metric == "mse":
        return ((cur - ref) ** 2).mean(-1).sum()
    raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


@dataclass
class Reference:
    """The full model at a batch's N loss positions: ref (N, V) fp32 logits, targets and alt (N,) long."""

    ref: torch.Tensor
    targets: torch.Tensor
    alt: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor, targets: torch.Tensor) -> "Reference":
        ref = logits.detach().float()
        others = ref.clone()
        others.scatter_(1, targets[:, None], -torch.inf)
        return cls(ref, targets, others.argmax(-1))


def check_inputs_variant(model: EdgeModel, alphas: list[float]) -> None:
    """EAP-IG on inputs needs a corrupted input to start the path from: refuse other ablations."""
    if model.ablation != "interchange" and any(a != 1.0 for a in alphas):
        raise ValueError(f"EAP-IG's inputs variant interpolates the clean and corrupted inputs, so it needs "
                         f"interchange ablation; {model.ablation} ablation defines ablated states but no input "
                         "that produces them: use the masks variant (--ig-variant masks, variant='masks', the "
                         "default under that ablation), "
                         "which integrates along the edge masks under any ablation, or EAP")


def count_loss_positions(batches: list) -> int:
    """The loss positions of ``batches`` (Batch objects), every metric's denominator; an error for none."""
    n_total = sum(int(b.loss_mask.sum()) for b in batches)
    if n_total == 0:
        raise ValueError("attribution got no loss positions (empty split?)")
    return n_total


def eap_buffers(model: EdgeModel, shape: tuple[int, int, int]) -> tuple[ReaderTaps, torch.Tensor]:
    """Reader taps over the kept (readers, B, T, D) fp32 buffer and the kept (W, B, T, D) fp32 buffer of
    writer differences, for a batch of ``shape`` (B, T, D) (``edgeprune.buffers``, names ``eap.*``)."""
    R, W = model.graph.num_readers, model.graph.num_writers
    taps = ReaderTaps(R, shape, model.device, buffers.take("eap.taps", (R, *shape), torch.float32, model.device))
    return taps, buffers.take("eap.diffs", (W, *shape), torch.float32, model.device)


def edge_scores(graph: Graph, total: torch.Tensor, n_alphas: int) -> torch.Tensor:
    """(S * E,) fp32 on CPU, span-major as the masks: ``-total / n_alphas`` at every edge of the (S, R, W)
    fp64 sums of ``contract``."""
    idx = graph.dense_index.to(total.device)
    edges = total.view(total.shape[0], -1)[:, idx].reshape(-1)
    return (-edges / n_alphas).float().cpu()


def input_gradient_scores(model: EdgeModel, batches, alphas: list[float], metric: str = "logit_diff",
                          progress: bool = False, desc: str = "attribute") -> torch.Tensor:
    """(E,) fp32 on CPU (S * E span-major for position-aware masks): ``-<s_w - s~_w, mean_alpha dm/dx_r>``
    with the plain model run on ``alpha * clean + (1 - alpha) * corrupted`` embeddings, m the metric
    averaged over every loss position of ``batches`` (Batch objects). See the module docstring."""
    check_metric(metric)
    check_inputs_variant(model, alphas)
    batches = list(batches)
    n_total = count_loss_positions(batches)
    graph = model.graph
    S = model.n_spans or 1
    total = torch.zeros((S, graph.num_readers, graph.num_writers), dtype=torch.float64, device=model.device)
    bar = tqdm(total=len(batches) * len(alphas), desc=desc, disable=not progress, leave=False)
    for batch in batches:
        grads, diffs = batch_reader_gradients(model, batch.to(model.device), alphas, metric, n_total,
                                              lambda: bar.update(1))
        contract(graph, grads, diffs, None if model.spans is None else batch.span_ids.to(model.device), S, total)
        del grads, diffs
    buffers.clear("eap.")  # not to sit beside a pruning run's peak after this
    bar.close()
    return edge_scores(graph, total, len(alphas))


def batch_reader_gradients(model: EdgeModel, batch, alphas: list[float], metric: str, n_total: int,
                           step=lambda: None) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch: (readers, B, T, D) fp32 ``sum_alpha dm/dx_r`` and (W, B, T, D) fp32 ``s_w - s~_w``,
    both views of buffers kept from batch to batch (``edgeprune.buffers``: let them go before the next).

    m is the metric summed over the batch's loss positions, divided by ``n_total``. The corrupted
    pass writes its states into the differences buffer and the clean pass subtracts itself from
    them in place (``mixing.StateSink``): under EAP that clean pass is the gradient pass itself."""
    ids, mask, sel = batch.input_ids, batch.attention_mask, batch.loss_mask
    B, T = ids.shape
    fam = model.family
    shape = (B, T, model.hf.config.hidden_size)
    targets = batch.target_ids[sel]
    taps, diffs = eap_buffers(model, shape)  # diffs (W, B, T, D), writer-major
    interchange = model.ablation == "interchange"
    if interchange and mask is not None and not torch.equal(mask, batch.corrupted_attention_mask):
        raise ValueError("EAP/EAP-IG (inputs variant): clean and corrupted inputs must have the same attention "
                         "mask (the path interpolates tokens, not padding); use --ig-variant masks")
    eap = alphas == [1.0]
    with torch.no_grad():
        ctx = fam.context(ids, mask, None)
        clean_emb = fam.embed(ids, ctx)  # (E, B, T, D)
        if interchange:
            model.full_forward(batch.corrupted_input_ids, batch.corrupted_attention_mask,
                               select=torch.zeros_like(sel), sink=StateSink(diffs))
        sink = StateSink(diffs, diffs if interchange else model.fixed_ablated_states())
        ref = corrupted_emb = None
        if not eap:  # the clean states and the reference, once for every alpha
            ref = Reference.of(model.full_forward(ids, mask, select=sel, sink=sink).logits, targets)
            corrupted_emb = fam.embed(batch.corrupted_input_ids, ctx)
            sink = None
    for alpha in alphas:
        with torch.no_grad():
            emb = clean_emb if alpha == 1.0 else (alpha * clean_emb.float()
                                                  + (1.0 - alpha) * corrupted_emb.float()).to(clean_emb.dtype)
        emb = emb.detach().requires_grad_(True)
        with torch.enable_grad():  # EAP: the clean forward itself gives the reference and the clean states
            out = model.full_forward(ids, mask, embeds=emb, taps=taps, select=sel, sink=sink)
            if ref is None:
                ref = Reference.of(out.logits, targets)
            m = metric_at_positions(out.logits, ref.ref, ref.targets, ref.alt, metric) / n_total
            torch.autograd.grad(m, emb)
        del out, m, emb
        step()
    return taps.finish(), diffs


CONTRACT_CHUNKS = 4  # reader chunks of the contraction: ~(1 + 1/k)/2 of the full (R x W) product's FLOPs
# each chunk's product as (writers, T·D) x (T·D, readers), transposed after: MKL runs it 1.05x (8 x 32) to 1.1x
# (16 x 64) faster than (readers, T·D) x (T·D, writers) at SmolLM2's shape (bench/attribution.py --vs)
CONTRACT_WRITERS_FIRST = True


def reader_chunks(graph: Graph, k: int = CONTRACT_CHUNKS) -> list[tuple[slice, int]]:
    """The readers in ``k`` consecutive chunks of about equal size: [(reader rows, writers the last of
    them sees)]. Readers see the writers before them (a lower triangle): one GEMM per chunk against
    the writers its last reader sees computes ~(1 + 1/k)/2 of the full product, and each GEMM stays
    large (per-layer products would read the writer states once per layer)."""
    R = graph.num_readers
    bounds = sorted({round(i * R / k) for i in range(k + 1)})
    return [(slice(a, b), graph.n_writers_before[b - 1]) for a, b in zip(bounds, bounds[1:])]


@torch.no_grad()
def contract(graph: Graph, grads: torch.Tensor, diffs: torch.Tensor, span_ids: torch.Tensor | None, n_spans: int,
             out: torch.Tensor) -> None:
    """out[s, r, w] += sum over the positions of span s (every position without spans) and d_model of
    grads[r] * diffs[w], for every edge (w < n_writers_before[r]; other entries get values too, never
    read): per example in fp32, summed over examples in fp64.

    grads (R, B, T, D) fp32; diffs (W, B, T, D) fp32; span_ids (B, T) long or None; out (S, R, W) fp64."""
    R, B = grads.shape[:2]
    W = diffs.shape[0]
    chunks = reader_chunks(graph)
    for b in range(B):
        if span_ids is None:
            parts = [(0, grads[:, b].reshape(R, -1), diffs[:, b].reshape(W, -1))]
        else:
            parts = []
            for s in range(n_spans):
                pos = (span_ids[b] == s).nonzero()[:, 0]
                if pos.numel():
                    parts.append((s, grads[:, b, pos].reshape(R, -1), diffs[:, b, pos].reshape(W, -1)))
        for s, g, d in parts:
            for rows, n in chunks:
                product = (d[:n] @ g[rows].T).T if CONTRACT_WRITERS_FIRST else g[rows] @ d[:n].T
                out[s, rows, :n] += product.double()
