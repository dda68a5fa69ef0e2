"""Sub-command ``generate``: continue prompts with the full model and a run's circuit, side by side."""

from __future__ import annotations

from pathlib import Path

import torch

from ..experiment import load_tokenizer
from ..generate import generate
from ..hub import quiet_progress
from ..rundir import load_circuit_model
from .run import _overrides


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompt-file {path}: no such file")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give a prompt: --prompt TEXT or --prompt-file FILE (one prompt per line)")
    return prompts


def _encode(tokenizer, texts: list[str]):
    """Left-padded (B, T) ids and mask, as HF's generate expects."""
    rows = [tokenizer(t)["input_ids"] for t in texts]
    T = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    return ids, mask


def _generate_cmd(args) -> int:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: must be at least 1, got {args.max_new_tokens}")
    prompts = _prompts(args)
    quiet_progress(not args.no_progress)
    model, info, _ = load_circuit_model(args.run_dir, _overrides(args), args.edges, args.allow_other_model)
    tok = load_tokenizer(model)
    ids, mask = _encode(tok, prompts)
    corrupted = corrupted_mask = None
    if args.corrupted_prompt:
        c_ids, c_mask = _encode(tok, [args.corrupted_prompt])
        need = ids.shape[1] + args.max_new_tokens
        if c_ids.shape[1] < need:
            raise ValueError(f"--corrupted-prompt has {c_ids.shape[1]} tokens; the prompt and --max-new-tokens need "
                             f"{need} (its states ablate each column of the generation)")
        corrupted, corrupted_mask = c_ids[:, :need], c_mask[:, :need]
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p)
    seed = args.seed
    full = generate(model, ids, mask, full=True, generator=torch.Generator().manual_seed(seed), **kw)
    circ = generate(model, ids, mask, corrupted_input_ids=corrupted, corrupted_attention_mask=corrupted_mask,
                    generator=torch.Generator().manual_seed(seed), **kw)
    T = ids.shape[1]
    c = info["counts"]
    print(f"circuit: {c['edges']} of {c['total_edges']} edges, ablation {model.ablation}")
    for i, prompt in enumerate(prompts):
        print(f"\nprompt:  {prompt}")
        print(f"full:    {tok.decode(full[i, T:], skip_special_tokens=True)}")
        print(f"circuit: {tok.decode(circ[i, T:], skip_special_tokens=True)}")
    return 0


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="continue prompts with the full model and the run's circuit, side by side")
    p.add_argument("run_dir")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-file", help="prompts, one per line")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--edges", help="use this edges.json instead of the run's masks")
    p.add_argument("--ablation", choices=("interchange", "zero", "mean"), help="override the run's ablation")
    p.add_argument("--corrupted-prompt", help="interchange ablation: the prompt whose states ablate each column "
                   "(at least as many tokens as the prompt plus --max-new-tokens)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--allow-other-model", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_generate_cmd)
