"""Run a circuit as a language model: greedy or sampled continuation, with an incremental KV cache.

``generate(model, input_ids, attention_mask, max_new_tokens=..., do_sample=False, ...)`` continues
(B, T) prompts with the circuit of the current masks (deterministic values), or with the full
model (``full=True``). Left-padded batches work as in HF's ``generate``: position ids come from the
attention mask (cumsum - 1), padding keys are masked, every new token is real.

Ablation while generating:
- ``zero`` / ``mean``: per position, as in the forward.
- ``interchange``: a fixed corrupted prompt ``corrupted_input_ids`` ((B or 1, Tc), its own
  ``corrupted_attention_mask``), column-aligned with the clean sequence as in the forward: the
  ablated writer states at column t are the full model's states on the corrupted prompt at column
  t. So Tc must cover the prompt and every generated token (Tc >= T + max_new_tokens): an error
  otherwise. Its states are computed once, with position ids from its own mask.

With ``use_cache=True`` (default) each step runs only the new column through the masked forward,
with the K/V readers' past outputs from ``kvcache.EdgeKVCache``; ``use_cache=False`` reruns the
whole sequence each step (the reference the cache is tested against). Sampling uses HF's logits
processors (temperature, top-k, top-p) and ``torch.multinomial`` with an explicit generator.
Finished rows (EOS) are padded with the pad token, and generation stops when every row is done,
as HF does.
"""

from __future__ import annotations


import torch

from .kvcache import EdgeKVCache, positions_from_mask


def context_length(model) -> int | None:
    """The model's context (positions) from its config, or None when it has no fixed one."""
    cfg = model.hf.config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    return None


def _eos_and_pad(model, eos_token_id, pad_token_id):
    gen = getattr(model.hf, "generation_config", None)
    if eos_token_id is None and gen is not None:
        eos_token_id = gen.eos_token_id
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if pad_token_id is None and gen is not None:
        pad_token_id = gen.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return eos, pad_token_id


def _processors(temperature, top_k, top_p, extra):
    # heavy: `import edgeprune` stays transformers-free
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    procs = LogitsProcessorList(extra or [])
    if temperature is not None and temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    return procs


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 20, do_sample: bool = False, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, logits_processor=None,
             generator: torch.Generator | None = None, corrupted_input_ids: torch.Tensor | None = None,
             corrupted_attention_mask: torch.Tensor | None = None, eos_token_id=None, pad_token_id=None,
             use_cache: bool = True, full: bool = False, return_logits: bool = False):
    """(B, T) prompts -> (B, T + n) token ids (n <= max_new_tokens); with ``return_logits`` also the
    (B, n, V) fp32 logits each step chose from (before the processors). Masks are deterministic
    (the model runs in eval mode here, and is put back as it was)."""
    was_training = model.training
    model.eval()
    try:
        return _generate(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                         logits_processor, generator, corrupted_input_ids, corrupted_attention_mask, eos_token_id,
                         pad_token_id, use_cache, full, return_logits)
    finally:
        model.train(was_training)


def _generate(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
              logits_processor, generator, corrupted_input_ids, corrupted_attention_mask, eos_token_id,
              pad_token_id, use_cache, full, return_logits):
    model._check_ids(input_ids, attention_mask, "input_ids")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    B, T = input_ids.shape
    n_ctx = context_length(model)
    if n_ctx is not None and T + max_new_tokens > n_ctx:
        raise ValueError(f"the prompt has {T} tokens and {max_new_tokens} new ones were asked for: {T + max_new_tokens} "
                         f"positions exceed the model's context of {n_ctx}; shorten the prompt or --max-new-tokens")
    device = model.device
    ids = input_ids.to(device)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device).long()
    ablated = None if full else _ablated(model, B, T + max_new_tokens, corrupted_input_ids, corrupted_attention_mask)
    eos, pad = _eos_and_pad(model, eos_token_id, pad_token_id)
    procs = _processors(temperature, top_k, top_p, logits_processor) if do_sample else \
        _processors(None, None, None, logits_processor)
    cache = EdgeKVCache() if use_cache else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new_ids = ids  # what the next step feeds (cached: the new column only)
    steps = []
    for _ in range(max_new_tokens):
        L = ids.shape[1]
        start = L - new_ids.shape[1]
        positions = positions_from_mask(mask)[:, start:]
        select = torch.zeros(new_ids.shape, dtype=torch.bool, device=device)
        select[:, -1] = True
        step_mask = mask if (cache is not None or attention_mask is not None) else None
        kwargs = dict(position_ids=positions, select=select, past_key_values=cache)
        if full:
            logits = model.full_forward(new_ids, step_mask, **kwargs).logits
        else:
            states = None if ablated is None else ablated[:, :, start:L]
            logits = model(new_ids, step_mask, corrupted_states=states, **kwargs).logits  # (B, V)
        logits = logits.float()
        steps.append(logits)
        scores = procs(ids, logits.clone())
        if do_sample:
            probs = torch.softmax(scores, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            token = scores.argmax(-1)
        token = torch.where(done, torch.full_like(token, pad), token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if eos:
            done = done | torch.isin(token, torch.tensor(eos, device=device))
        new_ids = token[:, None] if cache is not None else ids
        if bool(done.all()):
            break
    return (ids, torch.stack(steps, 1)) if return_logits else ids


def _ablated(model, B, needed, corrupted_ids, corrupted_mask):
    """The ablated writer states (W, B, Tc, D) for the columns of the whole generation, or None."""
    if model.ablation != "interchange":
        if corrupted_ids is not None:
            raise ValueError(f"corrupted_input_ids is only used under interchange ablation (this model: "
                             f"{model.ablation!r})")
        model.fixed_ablated_states()  # refuses mean ablation without mean states
        return None
    if corrupted_ids is None:
        raise ValueError("interchange ablation needs a corrupted prompt to generate (corrupted_input_ids / "
                         "--corrupted-prompt), or use ablation 'zero' or 'mean'")
    model._check_ids(corrupted_ids, corrupted_mask, "corrupted_input_ids")
    if corrupted_ids.shape[0] not in (1, B):
        raise ValueError(f"corrupted_input_ids must have 1 or {B} rows, got {corrupted_ids.shape[0]}")
    Tc = corrupted_ids.shape[1]
    if Tc < needed:
        raise ValueError(f"the corrupted prompt has {Tc} tokens but generation needs the ablated states of {needed} "
                         f"columns (prompt + max_new_tokens): give a corrupted prompt at least that long, or "
                         f"fewer new tokens")
    ids = corrupted_ids.to(model.device)
    mask = torch.ones_like(ids) if corrupted_mask is None else corrupted_mask.to(model.device)
    states = model.full_forward(ids, None if corrupted_mask is None else mask, position_ids=positions_from_mask(mask),
                                return_states=True).states  # (W, 1|B, Tc, D)
    return states.expand(states.shape[0], B, *states.shape[2:])
