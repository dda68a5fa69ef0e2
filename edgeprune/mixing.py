"""The writer mix: each reader's input as a mask-weighted sum of the writers before it.

    x_r = c_r + sum_w z_rw s_w + (1 - z_rw) s~_w

The layer constants ``c_r`` are added by the caller; this module computes the sum. Written this
way (rather than as s~ + z (s - s~)) the mix is exact at both ends: with every mask 1 it is the
plain fp32 sum of the clean states, with every mask 0 that of the ablated states. Writer states stay in the model's dtype, stored once per writer group;
the sum is formed in fp32 from transient per-group upcasts that are never saved for backward, so
bf16 models get fp32 accumulation without fp32 copies of the states.
"""

from __future__ import annotations

import torch

from .graph import Graph


def _delta(state: torch.Tensor, ablated: torch.Tensor | None) -> torch.Tensor:
    """(g, B, T, D) fp32: state minus its ablated value (ablated may broadcast, or be None = zero)."""
    d = state.float()
    return d if ablated is None else d - ablated.float()


class _WriterMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, n_groups, *tensors):
        states, ablated = tensors[:n_groups], tensors[n_groups:]
        out, start, R = None, 0, z.shape[0]
        for s, a in zip(states, ablated):
            g = s.shape[0]
            zg = z[:, start:start + g]
            part = (zg @ s.float().reshape(g, -1)).view(R, *s.shape[1:])
            if a is not None:  # a may broadcast over batch and positions (mean ablation)
                part.add_(((1.0 - zg) @ a.float().reshape(g, -1)).view(R, *a.shape[1:]))
            out = part if out is None else out.add_(part)
            start += g
        ctx.n_groups = n_groups
        ctx.save_for_backward(z, *states, *ablated)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        z, *rest = ctx.saved_tensors
        n = ctx.n_groups
        states, ablated = rest[:n], rest[n:]
        go = grad_out.reshape(z.shape[0], -1)
        grad_z = torch.zeros_like(z) if ctx.needs_input_grad[0] else None
        grad_states, start = [], 0
        for i, (s, a) in enumerate(zip(states, ablated)):
            g = s.shape[0]
            zg = z[:, start:start + g]
            if grad_z is not None:
                grad_z[:, start:start + g] = go @ _delta(s, a).reshape(g, -1).T
            if ctx.needs_input_grad[2 + i]:
                grad_states.append((zg.T @ go).view(s.shape).to(s.dtype))
            else:
                grad_states.append(None)
            start += g
        return (grad_z, None, *grad_states, *([None] * n))


def mix(z: torch.Tensor, states: list[torch.Tensor], ablated: list[torch.Tensor | None]) -> torch.Tensor:
    """sum_w z[:, w] s_w + (1 - z[:, w]) s~_w over the given writer groups.

    z: (R, W) fp32 with W = sum of group sizes; states: groups (g, B, T, D), model dtype;
    ablated: per group the same shape, a broadcastable (g, 1, 1, D), or None for zero.
    Returns (R, B, T, D) fp32. Gradients flow to z and to the states, never to ``ablated``.
    """
    ablated = [None if a is None else a.detach() for a in ablated]
    return _WriterMix.apply(z, len(states), *states, *ablated)


def dense_masks(graph: Graph, edge_values: torch.Tensor, node_values: torch.Tensor | None) -> torch.Tensor:
    """(readers, writers) fp32 matrix of effective masks; 0 where no edge exists.

    edge_values: (E,) in graph edge order. node_values: (W,) per writer or None. A node mask
    multiplies every edge out of its writer: x_r = s~ + z_rw z_w (s_w - s~_w).
    """
    idx = graph.dense_index.to(edge_values.device)
    flat = edge_values.new_zeros(graph.num_readers * graph.num_writers).index_put((idx,), edge_values)
    dense = flat.view(graph.num_readers, graph.num_writers)
    if node_values is not None:
        dense = dense * node_values[None, :]
    return dense
