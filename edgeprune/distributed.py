"""Pruning across processes: ``torchrun`` + FSDP2, the frozen weights sharded, the masks replicated.

    torchrun --nproc_per_node N -m edgeprune prune CONFIG        # one node, N processes
    run_scripts/torchrun.sh CONFIG / run_scripts/sbatch_prune.sh  # launchers (multi-node: rendezvous)

What is shared and what is split (DESIGN.md section 7):

- The frozen weights are sharded with PyTorch FSDP2: ``fully_shard`` per decoder layer, then the
  root (embeddings, final norm, read-out). The edge-masked forward calls each layer through its FSDP
  module (``register_fsdp_forward_method``), so a layer's weights are all-gathered just before it
  runs, freed after, and gathered again for its backward.
- The masks and lambdas are tiny and replicated: every rank holds all of them and samples them from
  the same seeded generator (so one sample serves the whole global batch, as in a single process).
  dL/dz is summed over ranks inside the backward, in fp64 (``EdgeModel.mask_grad_reduce``, see
  ``mixing``), so every rank ends the backward with the global mask gradients, bitwise equal to
  each other and to a single process's; clipping and the optimiser step then keep them identical.
- The data: each rank takes its contiguous slice of the global batch (``prune.batch_size`` is the
  global batch). The loss is the sum over this rank's loss positions divided by the global count;
  logged losses and validation metrics are summed across ranks in fp64.
- Rank 0 alone writes the run directory (config, log, checkpoints, masks), atomically as always.
  Every rank reads the checkpoint to resume, so ``run.output_dir`` must be on a filesystem all nodes
  see. The process group is gloo on CPU, nccl on GPU; ``close`` waits at a barrier and destroys it.

Without torchrun (no ``WORLD_SIZE`` in the environment) ``setup`` returns a one-process ``Dist``
whose methods are no-ops, so the pruning loop reads the same either way.
"""

from __future__ import annotations

import dataclasses
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .experiment import resolve_device


@dataclass
class Dist:
    """This process's place in the job: rank, world size, device; collectives are no-ops at world 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module initialised the process group (and destroys it)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ data
    def rows(self, n: int) -> slice:
        """This rank's contiguous share of n rows (sizes differ by at most one)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def shard(self, batch):
        """This rank's rows of a global ``tasks.jsonl.Batch`` (padding length kept: the same T everywhere)."""
        if not self.enabled:
            return batch
        rows = self.rows(batch.input_ids.shape[0])
        parts = {}
        for f in dataclasses.fields(batch):
            value = getattr(batch, f.name)
            parts[f.name] = value[rows] if isinstance(value, (torch.Tensor, list)) else value
        return dataclasses.replace(batch, **parts)

    # ------------------------------------------------------------------ collectives
    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a new tensor)."""
        if not self.enabled:
            return values
        out = values.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def sum_floats(self, values: dict[str, float]) -> dict[str, float]:
        """Sum a dict of Python numbers over ranks (same keys in the same order on every rank)."""
        if not self.enabled:
            return values
        keys = list(values)
        device = torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        summed = self.sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device))
        return {k: float(v) for k, v in zip(keys, summed.tolist())}

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self, clean: bool = True) -> None:
        """End the job: a barrier (so no rank exits while others still write), then destroy the group."""
        if not self.owns_group or not dist.is_initialized():
            return
        # free the FSDP-wrapped model's garbage cycles (and any work objects they hold) while the group
        # exists: the likely cause of a rank aborting at interpreter exit ("terminate called without an
        # active exception", once in four runs of tests/test_distributed.py on 2 CPU cores)
        gc.collect()
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def setup(device: str = "auto") -> tuple[Dist, torch.device]:
    """The ``Dist`` of this process (from torchrun's environment) and the device it computes on.

    Under torchrun (``WORLD_SIZE`` > 1) the process group starts here: nccl with one GPU per local
    rank (``cuda:LOCAL_RANK``) when the config's device is ``auto``/``cuda``, gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = resolve_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank, owns_group=owns), chosen


def shard_model(model, d: Dist) -> None:
    """Shard ``model``'s frozen weights with FSDP2 across the ranks of ``d`` (no-op at world 1).

    Also sets ``model.mask_grad_reduce`` so the backward sums dL/dz over the ranks.

    ``fully_shard`` wraps each decoder layer, then the HF root module; the masks are not part of the
    HF module and stay replicated. ``model.runner`` is pointed at the FSDP modules so the
    edge-masked forward (which calls layers piecewise, not through their ``forward``) still gets
    the all-gather before each layer and its backward, and the free after.
    """
    if not d.enabled:
        return
    # heavy: FSDP's modules load only when a job shards across ranks
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    hf = model.hf
    mesh = init_device_mesh(model.device.type, (d.world,))
    calls = []
    for layer in model.family.decoder_layers():
        fully_shard(layer, mesh=mesh)
        calls.append(_fsdp_call(layer, register_fsdp_forward_method))
    fully_shard(hf, mesh=mesh)
    model.runner.root_call = _fsdp_call(hf, register_fsdp_forward_method)
    model.runner.layer_calls = calls
    model.mask_grad_reduce = _all_reduce


def _all_reduce(t: torch.Tensor) -> None:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)


def _call(fn, *args):
    return fn(*args)


def _fsdp_call(module, register):
    """``module.edge_call(fn, *args)`` = fn(*args) inside ``module``'s FSDP pre/post-forward hooks."""
    module.edge_call = _call
    register(module, "edge_call")
    return module.edge_call
