"""EAP-IG along the edge masks (the "masks" variant) at one plain forward and backward per step.

The masks variant integrates dm/dz along z = alpha * 1: every edge mask at the same alpha. There the
edge-masked model's mix needs no per-reader product (``mixing.UniformMix``): each reader reads
(1 - alpha) R~ + alpha R, the ablated residual stream before it and the pass's own, so the masked
model at z = alpha * 1 is the plain model with that read at every reader. And since

    dm/dz_e = <dm/dx_r, s_w(alpha) - s~_w>        (e = (w, r); summed over batch, positions, d_model)

each step is one plain forward with *reader taps* (``edgeprune.taps``: dm/dx_r for every reader), a
sink writing the step's differences s_w(alpha) - s~_w into one fp32 buffer (``mixing.StateSink``:
the writer states move with alpha, s~ does not), and one contraction of the two
(``ig_inputs.contract``): per step, where the inputs variant contracts once per batch. Per batch: one
no-grad pass over the clean and corrupted inputs together (``eval.reference_and_corrupted``: the
reference logits and, under interchange ablation, the ablated states; zero and mean ablation have
theirs fixed). No edge-masked forward runs.

The scores are the edge-masked forward's ``-mean_alpha dm/dz (alpha * 1)``
(``attribution.path_gradient_scores``, kept as the reference, ``UNIFORM_PATH = False``), within fp32
noise: the reads sum the streams in another order. Any ablation, position-aware masks (the
contraction sums each span's positions apart). Node masks play no part in attribution.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .. import buffers
from ..eval import reference_and_corrupted
from ..mixing import StateSink, UniformMix, ablated_stream
from ..model import EdgeModel
from .ig_inputs import (Reference, check_metric, contract, count_loss_positions, eap_buffers, edge_scores,
                        metric_at_positions)

# EAP-IG's masks variant through the plain model (this module); False: through the edge-masked forward
# (``attribution.path_gradient_scores``, the reference), as ``bench/attribution.py --vs`` times it
UNIFORM_PATH = True


def uniform_path_scores(model: EdgeModel, batches, alphas: list[float], metric: str = "logit_diff",
                        progress: bool = False, desc: str = "attribute", reference=None) -> torch.Tensor:
    """(E,) fp32 on CPU (S * E span-major for position-aware masks): ``-mean_alpha dm/dz (alpha * 1)``, m
    the metric averaged over every loss position of ``batches`` (Batch objects). See the module docstring.

    ``reference``: what serves each batch's no-grad pass, called as ``reference(model, batch, select)``;
    None: ``eval.reference_and_corrupted``. A pruning run passes its ``cache.ReferenceCache``, so that
    these passes fill the cache its first epoch then reads (the same pass a pruning step makes)."""
    reference = reference_and_corrupted if reference is None else reference
    check_metric(metric)
    batches = list(batches)
    n_total = count_loss_positions(batches)
    graph, fam = model.graph, model.family
    S = model.n_spans or 1
    total = torch.zeros((S, graph.num_readers, graph.num_writers), dtype=torch.float64, device=model.device)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(batches) * len(alphas), desc=desc, disable=not progress, leave=False)
    try:
        for batch in batches:
            batch = batch.to(model.device)
            ids, mask, sel = batch.input_ids, batch.attention_mask, batch.loss_mask
            logits, corrupted = reference(model, batch, sel)
            ref = Reference.of(logits, batch.target_ids[sel])
            ablated = corrupted if model.ablation == "interchange" else model.fixed_ablated_states()
            stream = ablated_stream(graph, ablated, fam.attn_constant)
            shape = (*ids.shape, model.hf.config.hidden_size)
            span_ids = None if model.spans is None else batch.span_ids.to(model.device)
            with torch.no_grad():
                emb = fam.embed(ids, fam.context(ids, mask, None))
            taps, diffs = eap_buffers(model, shape)  # once a batch: every step overwrites both
            for alpha in alphas:
                taps.reset()
                start = emb.detach().requires_grad_(True)
                with torch.enable_grad():
                    out = model.full_forward(ids, mask, embeds=start, taps=taps, select=sel,
                                             sink=StateSink(diffs, ablated), path=UniformMix(alpha, stream))
                    m = metric_at_positions(out.logits, ref.ref, ref.targets, ref.alt, metric) / n_total
                    torch.autograd.grad(m, start)
                del out, m, start
                contract(graph, taps.finish(), diffs, span_ids, S, total)
                bar.update(1)
            del stream, ablated, corrupted, taps, diffs  # the kept buffers are free for the next batch
    finally:
        buffers.clear("eap.")  # not to sit beside a pruning run's peak after this
        bar.close()
        model.train(was_training)
    return edge_scores(graph, total, len(alphas))
