"""Time of EAP and EAP-IG per IG step against plain HF forward+backward on the same batch.

    python bench/attribution.py                               # smollm2 and gpt2, 8x32, both variants
    python bench/attribution.py --models smollm2 --layers 6 --variants inputs
    python bench/attribution.py --models gpt2 --shapes 8x32,32x64 --ig-steps 5 --repeats 5

Models as ``bench/step.py`` builds them (random weights at the real configs: ``smollm2`` is
SmolLM2-135M's, 30 layers, 9 query / 3 KV heads, d 576; ``gpt2`` GPT-2 small; ``--config DIR`` any HF
config.json; ``--layers`` shortens them). The batch: random tokens, a random corrupted input, the
metric (logit difference) at the last position of every example.

Each figure is a median over ``--repeats`` interleaved runs in one process: one attribution of the
batch (``eap_scores`` / ``eap_ig_scores`` with ``--ig-steps`` steps, as ``edgeprune attribute`` runs
it, the per-batch passes for the writer states included) and one HF forward+backward of the same
batch (``bench/step.py``'s ``HFStep``: gradient to the input embeddings, weights frozen,
cross-entropy over every position). Printed: seconds per IG step (an attribution's time divided by
its steps and ``--batches``; EAP is one step a batch) and its ratio to HF's forward+backward of one
batch, the medians' and the fastest runs' (on a shared machine other tenants only ever add time, so
the ratio of the minima is the steadier estimate). An attribution runs over ``--batches`` copies of
the batch (default 4), as over a real split (its big buffers are kept from batch to batch,
``edgeprune.buffers``). ``--repeats-masks`` sets the timed runs of the masks variant apart (default 1):
its reference path, the edge-masked forward (``--vs baselines.ig_masks.UNIFORM_PATH=False``), takes
2.5-4x HF per step (docs/scale.md).

``--parts`` also prints where an attribution's time goes, per batch: the plain no-grad passes (EAP's
corrupted pass, the inputs variant's clean pass, the masks variant's reference pass over clean and
corrupted inputs), the forwards with reader taps, the backwards, the contractions (each wrapped in
its own clock while the timed runs run), and HF's forward and backward apart.

``--vs MODULE.NAME=VALUE`` also times each attribution with that setting of an edgeprune module
switched (``bench/step.py``'s ``parse_setting``), interleaved with the default in the same repeats,
and prints the ratio (switched / default): e.g. ``--vs models.common.SHARED_FOLD=False``, the reader
taps' norm backward apart from the projections'.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from edgeprune import EdgeModel, buffers  # noqa: E402
from edgeprune.baselines import ig_inputs, ig_masks  # noqa: E402
from edgeprune.baselines.attribution import VARIANTS, eap_ig_scores, eap_scores  # noqa: E402
from step import DTYPES, Batch, HFStep, WithSetting, build_hf, device_time, make_clock, parse_setting, parse_shape  # noqa: E402


class AttributionBatch(Batch):
    """``bench/step.py``'s batch with the targets a metric needs (random tokens) and ``to``."""

    def __init__(self, B: int, T: int, vocab: int, device: torch.device):
        super().__init__(B, T, vocab, device)
        gen = torch.Generator().manual_seed(2)
        self.target_ids = torch.randint(0, vocab, (B, T), generator=gen).to(device)

    def to(self, device):
        return self


class Parts:
    """``--parts``: seconds spent in each phase of the attributions run inside ``with parts:``, summed over
    calls, by wrapping the functions that run the phases (restored on exit)."""

    def __init__(self, model: EdgeModel, device: torch.device):
        self.device, self.spent = device, {}
        self.targets = [(model, "full_forward", self._forward_label), (torch.autograd, "grad", lambda *a, **k: "backward")]
        self.targets += [(module, "contract", lambda *a, **k: "contraction") for module in (ig_inputs, ig_masks)]
        self.saved = []

    @staticmethod
    def _forward_label(*args, **kwargs) -> str:
        return "forward with reader taps" if kwargs.get("taps") is not None else "no-grad pass"

    def _wrap(self, fn, label):
        def timed(*args, **kwargs):
            start = device_time(self.device)
            try:
                return fn(*args, **kwargs)
            finally:
                name = label(*args, **kwargs)
                self.spent[name] = self.spent.get(name, 0.0) + device_time(self.device) - start
        return timed

    def __enter__(self):
        self.saved = [(owner, name, getattr(owner, name)) for owner, name, _ in self.targets]
        for (owner, name, label), (_, _, fn) in zip(self.targets, self.saved):
            setattr(owner, name, self._wrap(fn, label))
        return self

    def __exit__(self, *exc):
        for owner, name, fn in self.saved:
            if isinstance(owner, EdgeModel):  # the model's own method again (the wrapper was an instance attribute)
                delattr(owner, name)
            else:
                setattr(owner, name, fn)
        return False


def time_model(kind: str, shape: tuple[int, int], args, device) -> list[dict]:
    hf = build_hf(kind, args.layers, DTYPES[args.dtype], device)
    batch = AttributionBatch(*shape, hf.config.vocab_size, device)
    model = EdgeModel.from_hf(hf)
    hf_step = HFStep(hf, batch)
    clock = make_clock(device)
    runs = []
    batches = [batch] * args.batches  # one attribution over several batches, as a real split runs
    for variant in args.variants.split(","):
        runs.append(("eap", variant, args.batches, lambda v=variant: eap_scores(model, batches, variant=v)))
        runs.append(("eap-ig", variant, args.ig_steps * args.batches,
                     lambda v=variant: eap_ig_scores(model, batches, steps=args.ig_steps, variant=v)))
    out = []
    for method, variant, steps, fn in runs:
        repeats = args.repeats_masks if variant == "masks" else args.repeats
        times, hf_times, vs_times, hf_parts = [], [], [], []
        parts = Parts(model, device) if args.parts else None
        fn()  # warm-up
        # the same attribution with the --vs setting in force (restored after each run)
        vs_fn = WithSetting(lambda _clock: fn(), *args.vs[:3]) if args.vs else None
        if vs_fn:
            vs_fn(None)
        for _ in range(repeats):
            clock()
            hf_parts.append(hf_step(clock))
            hf_times.append(sum(hf_parts[-1].values()))
            clock()
            with parts or contextlib.nullcontext():
                fn()
            times.append(clock() / steps)
            if vs_fn:
                clock()
                vs_fn(None)
                vs_times.append(clock() / steps)
        per_step, hf_s = statistics.median(times), statistics.median(hf_times)
        out.append({"model": kind, "shape": f"{shape[0]}x{shape[1]}", "method": method, "variant": variant,
                    "steps": steps // args.batches, "per_step_s": per_step, "hf_s": hf_s, "ratio": per_step / hf_s,
                    "fastest_ratio": min(times) / min(hf_times), "graph": model.graph.describe()})
        r = out[-1]
        print(f"  {kind} {r['shape']} {method:<6} {variant:<6} ({r['steps']} step{'s' if r['steps'] > 1 else ''}): "
              f"{per_step:.3f} s/step, HF fwd+bwd {hf_s:.3f} s, ratio {r['ratio']:.2f}x (fastest runs "
              f"{r['fastest_ratio']:.2f}x)", flush=True)
        if parts is not None:  # per batch, averaged over the timed runs
            per_batch = {k: v / (repeats * args.batches) for k, v in parts.spent.items()}
            per_batch["other"] = statistics.mean(times) * steps / args.batches - sum(per_batch.values())
            hf_split = {k: statistics.median(p[k] for p in hf_parts) for k in hf_parts[0]}
            r["parts_per_batch_s"], r["hf_parts_s"] = per_batch, hf_split
            print("    a batch: " + ", ".join(f"{k} {v:.3f} s" for k, v in per_batch.items())
                  + "; HF: " + ", ".join(f"{k} {v:.3f} s" for k, v in hf_split.items()), flush=True)
        if args.vs:
            vs = statistics.median(vs_times)
            r["vs_s"] = vs
            print(f"    with {args.vs[3]}: {vs:.3f} s/step, {vs / hf_s:.2f}x HF; {vs / per_step:.3f}x the default's "
                  "time", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,gpt2", help="comma-separated models of bench/step.py")
    parser.add_argument("--config", action="append", default=[], metavar="DIR", help="also this HF config (random weights)")
    parser.add_argument("--shapes", default="8x32", help="comma-separated BxT")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4,
                        help="batches per attribution (the figure is per batch and IG step)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    parser.add_argument("--repeats-masks", type=int, default=1, help="timed runs of the masks variant")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--parts", action="store_true",
                        help="also print where a batch's time goes (passes, forwards, backwards, contractions)")
    parser.add_argument("--vs", default=None, metavar="MODULE.NAME=VALUE",
                        help="also time each attribution with this edgeprune setting switched, interleaved")
    args = parser.parse_args(argv)
    if args.vs:
        args.vs = (*parse_setting(args.vs), args.vs)
    buffers.tune_cpu_allocator()  # as the CLI: huge pages, glibc keeping its freed heap
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {args.device}, {args.dtype}, {torch.get_num_threads()} threads; per IG step "
          f"vs HF fwd+bwd, medians of {args.repeats} interleaved runs ({args.repeats_masks} for masks)")
    results = []
    for kind in [k for k in args.models.split(",") if k] + args.config:
        for shape in args.shapes.split(","):
            results += time_model(kind, parse_shape(shape), args, device)
    print("\n| model | B x T | method | variant | IG steps | s / IG step | HF fwd+bwd (s) | ratio | fastest runs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['shape']} | {r['method']} | {r['variant']} | {r['steps']} | {r['per_step_s']:.3f} "
              f"| {r['hf_s']:.3f} | {r['ratio']:.2f}x | {r['fastest_ratio']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
