"""Compile the Tracr RASP programs we ship and write their artifacts under ``data/tracr_models/<name>/``.

Tracr needs JAX; keep it out of the main environment and run this script from its own venv:

    python -m venv /tmp/tracr_venv
    /tmp/tracr_venv/bin/pip install tracr-pypi numpy safetensors
    /tmp/tracr_venv/bin/python run_scripts/compile_tracr.py            # writes data/tracr_models/*
    /tmp/tracr_venv/bin/python run_scripts/compile_tracr.py --check    # recompiles, compares, writes nothing

Working pins (Python 3.11, CPU): tracr-pypi==1.0.0, jax==0.10.2, jaxlib==0.10.2, dm-haiku==0.0.17,
chex==0.1.92, numpy==2.4.6, safetensors==0.8.0. The current releases worked unpinned; if a later jax
breaks tracr, pin these.

Programs (all from tracr's ``compiler.lib``, BOS token "BOS", max_seq_len 5 real tokens + BOS, task
length 4; small on purpose, so that tests stay fast):
- ``reverse``: ``make_reverse(tokens)`` (with ``make_length``), vocab {1, 2, 3}, categorical, non-causal.
- ``xproportion``: ``make_frac_prevs(tokens == "x")``, vocab {a, b, c, x}, numerical, causal.
- ``length``: ``make_length()``, vocab {a, b, c}, categorical (the length at every position).
- ``hist``: ``make_hist()``, vocab {a, b, c}, categorical (occurrences of each position's token).
- ``count_a``: ``make_count(tokens, "a")``, vocab {a, b, c}, categorical.
- ``sort_unique``: ``make_sort_unique(tokens, tokens)``, vocab {1..5}, categorical; defined only on
  sequences of distinct tokens (``input_set: distinct``), so its reference outputs, the check of its
  attention fallback and its task hold only those.
- ``pair_balance``: ``make_pair_balance(tokens, "(", ")")``, vocab {(, ), x}, numerical, causal.

Per program the script writes
- ``weights.safetensors``: fp32 arrays in TransformerLens names and input-major layouts (all
  ``x @ W``): ``embed.W_E`` (n_vocab, D) rows in input-encoding id order, ``pos_embed.W_pos``
  (max_seq_len + 1, D) (position 0 is BOS), per layer ``blocks.{l}.attn.W_Q/W_K/W_V`` (H, D, key_size),
  ``b_Q/b_K/b_V`` (H, key_size), ``W_O`` (H, key_size, D), ``b_O`` (D,), ``blocks.{l}.mlp.W_in``
  (D, mlp_hidden), ``b_in``, ``W_out`` (mlp_hidden, D), ``b_out``, and ``unembed.W_U`` (D, n_out),
  the projection onto the output space.
- ``config.json``: shapes, attention scaling, vocabulary and encodings, residual labels, versions.
- ``reference_outputs.json``: the compiled (JAX) model's outputs on every input of the program's
  input set (``input_set``: all sequences, or those of distinct tokens) of every length
  1..max_seq_len, at the non-BOS positions (tracr's own decoding replaces the BOS position's output).
  This is the program's own input set: ``data.path: tracr`` uses its inputs of the task length.
- ``ground_truth.json``: the circuit as ``[writer, reader]`` pairs (``edges.json`` format), derived
  from the weights (see ``derive_ground_truth``) and verified by ``tests/test_tracr.py``.

Tracr layer l is our layer l: its attention sublayer holds heads ``a{l}.h*``, its MLP sublayer is
``m{l}``. Tracr pads every layer to the largest head count with all-zero heads and leaves empty
sublayers all-zero; such heads/MLPs write nothing and get no ground-truth edges.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
BOS = "BOS"
ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "data" / "tracr_models"


def _programs():
    from tracr.compiler import lib
    from tracr.rasp import rasp

    return {
        "reverse": dict(program=lambda: lib.make_reverse(rasp.tokens), vocab=[1, 2, 3], max_seq_len=5,
                        causal=False, task_length=4,
                        description="reverse the input sequence (make_length + make_reverse from tracr.compiler.lib)"),
        "xproportion": dict(program=lambda: lib.make_frac_prevs(rasp.tokens == "x"), vocab=["a", "b", "c", "x"],
                            max_seq_len=5, causal=True, task_length=4,
                            description="fraction of tokens so far that are 'x' (make_frac_prevs(tokens == 'x'))"),
        "length": dict(program=lambda: lib.make_length(), vocab=["a", "b", "c"], max_seq_len=5, causal=False,
                       task_length=4, description="the length of the input at every position (make_length)"),
        "hist": dict(program=lambda: lib.make_hist(), vocab=["a", "b", "c"], max_seq_len=5, causal=False,
                     task_length=4, description="how often each position's token occurs in the input (make_hist)"),
        "count_a": dict(program=lambda: lib.make_count(rasp.tokens, "a"), vocab=["a", "b", "c"], max_seq_len=5,
                        causal=False, task_length=4,
                        description="how many tokens are 'a', at every position (make_count(tokens, 'a'))"),
        "sort_unique": dict(program=lambda: lib.make_sort_unique(rasp.tokens, rasp.tokens), vocab=[1, 2, 3, 4, 5],
                            max_seq_len=5, causal=False, task_length=4, inputs="distinct",
                            description="sort the tokens (make_sort_unique(tokens, tokens)); defined on "
                                        "sequences of distinct tokens only"),
        "pair_balance": dict(program=lambda: lib.make_pair_balance(rasp.tokens, "(", ")"), vocab=["(", ")", "x"],
                             max_seq_len=5, causal=True, task_length=4,
                             description="fraction of '(' minus fraction of ')' so far "
                                         "(make_pair_balance(tokens, '(', ')'))"),
        # deeper programs (6-8 layers, 1-2 heads, all-zero heads and sublayers), for target-free pruning
        "shuffle_dyck": dict(program=lambda: lib.make_shuffle_dyck(["()"]), vocab=["(", ")", "x"],
                             max_seq_len=5, causal=True, task_length=4,
                             description="1 where the whole input is a balanced '()' sequence, else 0, at "
                                         "every position (make_shuffle_dyck(['()']))"),
        "sort_freq": dict(program=lambda: lib.make_sort_freq(5), vocab=["a", "b", "c"], max_seq_len=5,
                          causal=False, task_length=4,
                          description="the tokens sorted by decreasing frequency (make_sort_freq)"),
        "frac_dyck": dict(program=lambda: lib.make_frac_prevs(rasp.Map(lambda t: t == 1, lib.make_shuffle_dyck(["()"]))),
                          vocab=["(", ")", "x"], max_seq_len=5, causal=True, task_length=4,
                          description="fraction of positions so far at which shuffle_dyck(['()']) is 1 "
                                      "(make_frac_prevs over make_shuffle_dyck)"),
    }


PROGRAM_NAMES = ("reverse", "xproportion", "length", "hist", "count_a", "sort_unique", "pair_balance",
                 "shuffle_dyck", "sort_freq", "frac_dyck")


# ---------------------------------------------------------------------------------------- compile
def compile_program(name: str):
    """The tracr ``AssembledTransformerModel`` of a shipped program."""
    from tracr.compiler import compiling
    from tracr.rasp import rasp

    # Residual labels carry tracr's global expression ids: restart the counter so that a program's
    # labels do not depend on which programs were compiled before it in this process.
    rasp.RASPExpr._ids = itertools.count(1)
    spec = _programs()[name]
    return compiling.compile_rasp_to_model(spec["program"](), vocab=set(spec["vocab"]),
                                           max_seq_len=spec["max_seq_len"], causal=spec["causal"],
                                           compiler_bos=BOS)


def extract_weights(assembled) -> dict[str, np.ndarray]:
    """Tracr's haiku params as our named fp32 arrays (shapes in the module docstring)."""
    p = {k: {n: np.asarray(a, dtype=np.float32) for n, a in v.items()} for k, v in assembled.params.items()}
    cfg = assembled.model_config
    H, dk = cfg.num_heads, cfg.key_size
    D = p["token_embed"]["embeddings"].shape[1]
    out = {"embed.W_E": p["token_embed"]["embeddings"], "pos_embed.W_pos": p["pos_embed"]["embeddings"]}
    for l in range(cfg.num_layers):
        attn, mlp = f"transformer/layer_{l}/attn", f"transformer/layer_{l}/mlp"
        for ours, theirs in (("Q", "query"), ("K", "key"), ("V", "value")):
            out[f"blocks.{l}.attn.W_{ours}"] = p[f"{attn}/{theirs}"]["w"].reshape(D, H, dk).transpose(1, 0, 2)
            out[f"blocks.{l}.attn.b_{ours}"] = p[f"{attn}/{theirs}"]["b"].reshape(H, dk)
        out[f"blocks.{l}.attn.W_O"] = p[f"{attn}/linear"]["w"].reshape(H, dk, D)
        out[f"blocks.{l}.attn.b_O"] = p[f"{attn}/linear"]["b"]
        out[f"blocks.{l}.mlp.W_in"] = p[f"{mlp}/linear_1"]["w"]
        out[f"blocks.{l}.mlp.b_in"] = p[f"{mlp}/linear_1"]["b"]
        out[f"blocks.{l}.mlp.W_out"] = p[f"{mlp}/linear_2"]["w"]
        out[f"blocks.{l}.mlp.b_out"] = p[f"{mlp}/linear_2"]["b"]
    labels = assembled.residual_labels
    out_dims = output_dims(assembled)
    W_U = np.zeros((D, len(out_dims)), dtype=np.float32)
    W_U[out_dims, np.arange(len(out_dims))] = 1.0
    out["unembed.W_U"] = W_U
    assert len(labels) == D
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def output_dims(assembled) -> list[int]:
    """Residual dims of the output space, in tracr's output-encoding order."""
    labels = assembled.residual_labels
    enc = assembled.output_encoder
    if hasattr(enc, "encoding_map"):  # categorical: one dim per output value
        name = _output_name(assembled)
        by_id = sorted(enc.encoding_map.items(), key=lambda kv: kv[1])
        return [labels.index(f"{name}:{value}") for value, _ in by_id]
    return [labels.index(_output_name(assembled))]


def _output_name(assembled) -> str:
    """Label stem of the output space: the one residual variable the unembedding reads."""
    import haiku as hk
    import jax.numpy as jnp

    D = len(assembled.residual_labels)

    # Push each basis vector through tracr's unembedding: the dims it keeps are the output space.
    @hk.without_apply_rng
    @hk.transform
    def unembed(x):
        return assembled.get_compiled_model().unembed(x, use_unembed_argmax=False)

    eye = jnp.eye(D)[None]
    kept = np.asarray(unembed.apply(assembled.params, eye))[0]
    kept = kept.reshape(D, -1)
    dims = [d for d in range(D) if np.abs(kept[d]).max() > 0]
    names = {assembled.residual_labels[d].split(":")[0] for d in dims}
    assert len(names) == 1, f"output space spans several variables: {names}"
    return names.pop()


def make_config(name: str, assembled, weights) -> dict:
    spec = _programs()[name]
    cfg = assembled.model_config
    labels = list(assembled.residual_labels)
    enc = assembled.input_encoder
    input_encoding = sorted(([tok, i] for tok, i in enc.encoding_map.items()), key=lambda kv: kv[1])
    categorical = hasattr(assembled.output_encoder, "encoding_map")
    heads_per_layer, mlp_active = [], []
    for l in range(cfg.num_layers):
        w_o = weights[f"blocks.{l}.attn.W_O"]
        heads_per_layer.append(int(sum(np.abs(w_o[h]).max() > 0 for h in range(cfg.num_heads))))
        mlp_active.append(bool(np.abs(weights[f"blocks.{l}.mlp.W_out"]).max() > 0))
    dims = output_dims(assembled)
    out = {
        "model_type": "tracr",
        "format_version": FORMAT_VERSION,
        "program": name,
        "description": spec["description"],
        "n_layers": cfg.num_layers,
        "n_heads": cfg.num_heads,
        "heads_per_layer": heads_per_layer,
        "mlp_active": mlp_active,
        "head_padding": "every layer has n_heads heads; tracr pads layers with fewer heads, and empty "
                        "attention sublayers, with all-zero heads (heads_per_layer counts the non-zero ones)",
        "d_model": len(labels),
        "key_size": cfg.key_size,
        "mlp_hidden": cfg.mlp_hidden_size,
        "max_seq_len": spec["max_seq_len"],
        "n_ctx": spec["max_seq_len"] + 1,
        "causal": bool(cfg.causal),
        "attention": {"logits": "(q . k) / sqrt(key_size), masked keys set to mask_value, then softmax",
                      "scale": float(1.0 / np.sqrt(cfg.key_size)), "mask_value": -1e30},
        "activation": "relu",
        "layer_norm": False,
        "vocab": list(spec["vocab"]),
        "bos_token": BOS,
        "pad_token": enc.pad_token,
        "input_encoding": input_encoding,
        "output_kind": "categorical" if categorical else "numerical",
        "output_dims": dims,
        **({"output_encoding": sorted(([i, v] for v, i in assembled.output_encoder.encoding_map.items()),
                                      key=lambda kv: kv[0])} if categorical else {"output_label": labels[dims[0]]}),
        "task_length": spec["task_length"],
        "input_set": spec.get("inputs", "all"),
        "residual_labels": labels,
        "compiler": {"mlp_exactness": 100, "compiler_bos": BOS},
        "versions": {pkg: _version(pkg) for pkg in ("tracr-pypi", "jax", "jaxlib", "dm-haiku")},
    }
    return out


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------- reference outputs
def all_inputs(vocab, length: int) -> list[list]:
    """Every input sequence of ``length`` tokens (no BOS), in lexicographic vocabulary order."""
    return [list(seq) for seq in itertools.product(vocab, repeat=length)]


def program_inputs(spec: dict, length: int) -> list[list]:
    """The program's own input set at ``length``: every sequence, or (``inputs: distinct``) the
    sequences of distinct tokens, on which programs such as ``make_sort_unique`` are defined."""
    seqs = all_inputs(spec["vocab"], length)
    if spec.get("inputs") == "distinct":
        seqs = [s for s in seqs if len(set(s)) == len(s)]
    return seqs


def run_compiled(assembled, inputs: list[list]):
    """The JAX model on equal-length inputs: (outputs at non-BOS positions, attention logits per layer).

    Categorical outputs are decoded values, numerical ones float32 values. Attention logits are
    tracr's own: (B, H, T, T), already scaled, masked entries -1e30.
    """
    import jax

    ids = np.array([assembled.input_encoder.encode([BOS] + seq) for seq in inputs])
    out = jax.jit(assembled.forward)(assembled.params, ids)
    raw = np.asarray(out.unembedded_output)[:, 1:]  # (B, n): argmax ids or numbers
    logits = [np.asarray(a) for a in out.transformer_output.attn_logits]
    if hasattr(assembled.output_encoder, "encoding_map"):
        decoded = [assembled.output_encoder.decode(row.tolist()) for row in raw]
    else:
        decoded = [[_f32(v) for v in row] for row in raw]
    return decoded, logits


def _f32(v) -> float:
    """A float32 as the shortest decimal that round-trips through float32 (small, exact JSON)."""
    return float(str(np.float32(v)))


def reference_outputs(name: str, assembled) -> dict:
    spec = _programs()[name]
    cases = []
    for n in range(1, spec["max_seq_len"] + 1):
        inputs = program_inputs(spec, n)
        if not inputs:
            continue
        outputs, _ = run_compiled(assembled, inputs)
        cases.extend({"input": seq, "output": out} for seq, out in zip(inputs, outputs))
    categorical = hasattr(assembled.output_encoder, "encoding_map")
    return {
        "format_version": FORMAT_VERSION,
        "program": name,
        "output_kind": "categorical" if categorical else "numerical",
        "input_set": spec.get("inputs", "all"),
        "note": "outputs of the compiled JAX model (fp32) at the non-BOS positions, for every input of the "
                "program's input set (input_set: all sequences, or those of distinct tokens) of every length "
                "1..max_seq_len; categorical: decoded values (null where undefined), numerical: raw values",
        "cases": cases,
    }


# ---------------------------------------------------------------------------------------- ground truth
def _nz(x: np.ndarray, axis: int) -> set[int]:
    """Indices along the other axis of a 2-D array that hold a non-zero entry."""
    return set(np.flatnonzero(np.abs(x).max(axis=axis, initial=0.0) > 0).tolist())


def derive_ground_truth(weights: dict[str, np.ndarray], config: dict, selector_total) -> tuple[list, dict]:
    """The circuit of a compiled Tracr model from its weights, under zero ablation.

    Rule. A writer writes the residual dims where its output map is non-zero: rows of ``W_E`` /
    ``W_pos`` (any token, any position), columns of a head's OV circuit ``W_V[h] @ W_O[h]``, columns
    of ``W_out`` over live MLP neurons (non-zero in both ``W_in`` and ``W_out``). A reader reads the
    dims where its input map is non-zero: rows (Q) and columns (K) of the QK circuit
    ``W_Q[h] @ W_K[h].T``, rows (V) of the OV circuit, rows of ``W_in`` over live neurons, rows of
    ``W_U`` (``resid_post``). Using the QK/OV circuits rather than the raw factors matters: tracr's
    ``W_K`` is a padded projection of the whole key space, ``W_V`` maps the BOS direction to the
    default output 0. An edge is in the circuit iff the two sets overlap.

    Exclusions (reads of the always-on dims ``one`` and ``tokens:BOS``, and of an uninformative QK
    circuit, that only ever change the BOS position). Outputs are read at the non-BOS positions
    only; a change confined to the BOS position reaches them only through a later head's key or
    value at the BOS key. ``_bos_confined`` follows the dims a head writes through later MLPs and
    queries (which stay at the BOS position) and refuses the exclusion if a later K or V reads them.
    - Fallback term: tracr's categorical attention gives the query's ``one`` dim a logit c on the
      BOS key (the only entry of that QK row and column) with c = half the match logit, and ``W_OV``
      maps BOS to 0: a query that matches no key attends to BOS and outputs 0. Where every non-BOS
      query matches some key (``selector_total``: checked on the compiled model's own attention
      logits for every input of every length, since it is a property of the program's values,
      not of one weight matrix), the term changes only the BOS position, plus non-BOS outputs by
      about exp(-c / sqrt(key_size)) (6e-7 on reverse's scores, nothing visible on xproportion's
      values): no decoded output changes. Then Q's read of ``one`` and K's read of ``tokens:BOS``
      are dropped.
    - Uniform QK: a head whose Q and K read only dims that only the embeddings write, and whose QK logits are the same for
      every key, for every non-BOS query state (every token at every position, with either
      embedding zero-ablated or not), attends uniformly whatever its Q/K inputs are, exactly as with
      its Q/K zero-ablated (tracr's SelectorWidth of the all-true selector: 100 on every token key
      and, through ``one`` x ``tokens:BOS``, 100 on BOS). Its Q and K reads matter only at the BOS
      query and are dropped.
    Reads of ``one`` by MLPs are never dropped: tracr uses ``one`` as the bias of its discretising
    and sequence-map MLPs, and zero-ablating it changes their outputs.

    Returns (edges as [writer, reader] in graph order, notes explaining each exclusion).
    """
    L, H = config["n_layers"], config["n_heads"]
    labels = config["residual_labels"]
    enc = dict((str(t), i) for t, i in config["input_encoding"])
    bos_id, pad = enc[BOS], config.get("pad_token")
    one, bos_dim = labels.index("one"), labels.index(f"tokens:{BOS}")
    W_E, W_pos = weights["embed.W_E"], weights["pos_embed.W_pos"]
    # The always-on dims, checked from the weights rather than trusted from the labels.
    assert np.all(W_E[:, one] == 1.0), "'one' must be 1 in every token embedding"
    assert W_E[bos_id, bos_dim] != 0 and np.count_nonzero(W_E[:, bos_dim]) == 1, "tokens:BOS is BOS-only"
    for key, w in weights.items():
        if ".b_" in key and np.any(w != 0):
            raise NotImplementedError(f"{key} is non-zero; the derivation assumes tracr's zero biases")

    writes: dict[str, set[int]] = {"tok_embeds": _nz(W_E, 0), "pos_embeds": _nz(W_pos, 0)}
    reads: dict[str, set[int]] = {}
    qk, ov = {}, {}
    order = []  # sublayers in forward order: ("attn", l) / ("mlp", l)
    for l in range(L):
        for h in range(H):
            a = f"a{l}.h{h}"
            qk[a] = weights[f"blocks.{l}.attn.W_Q"][h] @ weights[f"blocks.{l}.attn.W_K"][h].T  # (D, D)
            ov[a] = weights[f"blocks.{l}.attn.W_V"][h] @ weights[f"blocks.{l}.attn.W_O"][h]  # (D, D)
            reads[f"{a}.q"], reads[f"{a}.k"] = _nz(qk[a], 1), _nz(qk[a], 0)
            reads[f"{a}.v"], writes[a] = _nz(ov[a], 1), _nz(ov[a], 0)
        order.append(("attn", l))
        W_in, W_out = weights[f"blocks.{l}.mlp.W_in"], weights[f"blocks.{l}.mlp.W_out"]
        live = sorted(_nz(W_in, 0) & _nz(W_out, 1))
        reads[f"m{l}"], writes[f"m{l}"] = _nz(W_in[:, live], 1), _nz(W_out[live], 0)
        order.append(("mlp", l))
    reads["resid_post"] = _nz(weights["unembed.W_U"], 1)
    naive_reads = {r: set(d) for r, d in reads.items()}

    notes = {}
    real_tokens = [i for t, i in enc.items() if i != bos_id and t != str(pad)]
    for l in range(L):
        for h in range(H):
            a = f"a{l}.h{h}"
            if not reads[f"{a}.q"]:
                continue
            q_reads, k_reads = reads[f"{a}.q"], reads[f"{a}.k"]
            M = qk[a]
            fallback = (M[one, bos_dim] > 0 and np.count_nonzero(M[one]) == 1
                        and np.count_nonzero(M[:, bos_dim]) == 1 and not np.any(ov[a][bos_dim]))
            if fallback:
                c = M[one, bos_dim]
                match = M.copy()
                match[one, bos_dim] = 0
                if np.isclose(2 * c, match.max()) and selector_total(l, h, c * config["attention"]["scale"]):
                    if _bos_confined(a, l, writes, naive_reads, order, H):
                        q_reads.discard(one)
                        k_reads.discard(bos_dim)
                        notes[a] = (f"fallback term dropped: QK[one, tokens:BOS] = {c:g} = half the match "
                                    f"logit, OV maps BOS to 0, and every non-BOS query matches a key")
                continue
            later = set().union(*(d for w, d in writes.items() if w not in ("tok_embeds", "pos_embeds")))
            if not (q_reads | k_reads) & later and _uniform_qk(M, W_E, W_pos, bos_id, real_tokens,
                                                                 config["causal"]):
                if _bos_confined(a, l, writes, naive_reads, order, H):
                    q_reads.clear()
                    k_reads.clear()
                    notes[a] = ("uniform QK dropped: every non-BOS query gives every key the same logit "
                                "(also with either embedding zero-ablated), so Q/K only shape the BOS row")

    graph_edges = []
    writers = ["tok_embeds", "pos_embeds"]
    for l in range(L):
        heads = [f"a{l}.h{h}" for h in range(H)]
        for kind in "qkv":
            for a in heads:
                graph_edges += [(w, f"{a}.{kind}") for w in writers]
        writers = writers + heads
        graph_edges += [(w, f"m{l}") for w in writers]
        writers = writers + [f"m{l}"]
    graph_edges += [(w, "resid_post") for w in writers]
    edges = [[w, r] for w, r in graph_edges if writes[w] & reads[r]]
    return edges, notes


def _uniform_qk(M, W_E, W_pos, bos_id, real_tokens, causal) -> bool:
    """Whether every non-BOS query state gives every key state the same logit under QK circuit M.

    Query states: a real token at position p >= 1, with its token and/or position embedding
    zero-ablated or not; key states: BOS at position 0 and every real token at every position, with
    the same ablations. (Under causal masking a query sees a prefix of these keys.)
    """
    n_ctx = W_pos.shape[0]
    for q_tok_on, q_pos_on, k_tok_on, k_pos_on in itertools.product([0, 1], repeat=4):
        keys = [k_tok_on * W_E[bos_id] + k_pos_on * W_pos[0]]
        keys += [k_tok_on * W_E[t] + k_pos_on * W_pos[p] for t in real_tokens for p in range(1, n_ctx)]
        K = np.stack(keys)
        for t in real_tokens:
            for p in range(1, n_ctx):
                q = q_tok_on * W_E[t] + q_pos_on * W_pos[p]
                logits = K @ (M.T @ q)
                if not np.allclose(logits, logits[0]):
                    return False
    return True


def _bos_confined(head: str, layer: int, writes, reads, order, H) -> bool:
    """Whether a change to ``head``'s output at the BOS position can never reach a non-BOS output.

    Per position, a change spreads through MLPs and through queries (both stay at the same
    position); it leaves the BOS position only through a later head's key or value.
    """
    tainted = set(writes[head])
    started = False
    for kind, l in order:
        if kind == "attn" and l == layer:
            started = True
            continue
        if not started:
            continue
        if kind == "mlp":
            if reads[f"m{l}"] & tainted:
                tainted |= writes[f"m{l}"]
            continue
        new = set()
        for h in range(H):
            a = f"a{l}.h{h}"
            if (reads[f"{a}.k"] | reads[f"{a}.v"]) & tainted:
                return False
            if reads[f"{a}.q"] & tainted:
                new |= writes[a]
        tainted |= new
    return True


def selector_checker(assembled, name: str):
    """``selector_total(l, h, c)``: on every input of every length, does every non-BOS query of head
    (l, h) have a visible non-BOS key whose logit beats the BOS key's by at least the fallback logit c?"""
    spec = _programs()[name]
    per_length = [run_compiled(assembled, program_inputs(spec, n))[1]
                  for n in range(1, spec["max_seq_len"] + 1) if program_inputs(spec, n)]

    def total(l: int, h: int, c: float) -> bool:
        for logits in per_length:
            x = logits[l][:, h, 1:, :]  # (B, T-1, T): non-BOS queries
            bos, rest = x[..., 0], x[..., 1:]
            rest = np.where(rest <= -1e29, -np.inf, rest)
            if not np.all(rest.max(-1) - bos >= c * (1 - 1e-5)):
                return False
        return True

    return total


# ---------------------------------------------------------------------------------------- main
def build(name: str) -> dict:
    """Everything written for one program: {file name: content}."""
    assembled = compile_program(name)
    weights = extract_weights(assembled)
    config = make_config(name, assembled, weights)
    edges, notes = derive_ground_truth(weights, config, selector_checker(assembled, name))
    config["ground_truth_notes"] = notes
    return {"weights": weights, "config": config, "reference": reference_outputs(name, assembled),
            "ground_truth": edges, "assembled": assembled}


def write(name: str, built: dict, out_dir: Path) -> None:
    from safetensors.numpy import save_file

    d = out_dir / name
    d.mkdir(parents=True, exist_ok=True)
    save_file(built["weights"], str(d / "weights.safetensors"), metadata={"format_version": str(FORMAT_VERSION)})
    (d / "config.json").write_text(_dump_fields(built["config"]))
    pairs = ",\n".join("  " + json.dumps(pair) for pair in built["ground_truth"])
    (d / "ground_truth.json").write_text(f"[\n{pairs}\n]\n")
    ref = built["reference"]
    lines = ",\n".join("  " + json.dumps(c, separators=(",", ":")) for c in ref["cases"])
    head = json.dumps({k: v for k, v in ref.items() if k != "cases"})[:-1]
    (d / "reference_outputs.json").write_text(f'{head}, "cases": [\n{lines}\n]}}\n')
    for f in d.iterdir():
        f.chmod(0o644)  # safetensors writes 0600


def _dump_fields(obj: dict) -> str:
    """JSON with one top-level field per line (lists stay on one line: readable diffs, small files)."""
    return "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in obj.items()) + "\n}\n"


def check(name: str, built: dict, out_dir: Path) -> list[str]:
    """Differences between a fresh compile and the files on disk (empty when they agree)."""
    from safetensors.numpy import load_file

    d = out_dir / name
    problems = []
    stored = load_file(str(d / "weights.safetensors"))
    for k, v in built["weights"].items():
        if k not in stored or stored[k].shape != v.shape or not np.array_equal(stored[k], v):
            problems.append(f"{d / 'weights.safetensors'}: {k} differs")
    fresh = json.loads(json.dumps(built["config"]))
    disk = json.loads((d / "config.json").read_text())
    for k in sorted(set(fresh) | set(disk)):
        if k != "versions" and fresh.get(k) != disk.get(k):
            problems.append(f"{d / 'config.json'}: field {k!r} differs")
    if json.loads(json.dumps(built["ground_truth"])) != json.loads((d / "ground_truth.json").read_text()):
        problems.append(f"{d / 'ground_truth.json'} differs")
    if json.loads(json.dumps(built["reference"])) != json.loads((d / "reference_outputs.json").read_text()):
        problems.append(f"{d / 'reference_outputs.json'} differs")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("programs", nargs="*", default=list(PROGRAM_NAMES), help=f"subset of {PROGRAM_NAMES}")
    ap.add_argument("-o", "--out", type=Path, default=OUT_DIR, help="output folder (default data/tracr_models)")
    ap.add_argument("--check", action="store_true", help="recompile and compare with the files, write nothing")
    args = ap.parse_args(argv)
    failed = False
    for name in args.programs:
        if name not in PROGRAM_NAMES:
            ap.error(f"unknown program {name!r}; known: {', '.join(PROGRAM_NAMES)}")
        built = build(name)
        cfg = built["config"]
        summary = (f"{name}: {cfg['n_layers']} layers x {cfg['n_heads']} heads, d_model {cfg['d_model']}, "
                   f"{len(built['ground_truth'])} ground-truth edges")
        if args.check:
            problems = check(name, built, args.out)
            failed |= bool(problems)
            print(summary, "OK" if not problems else "MISMATCH\n  " + "\n  ".join(problems))
        else:
            write(name, built, args.out)
            print(summary, "->", args.out / name)
        for head, note in cfg["ground_truth_notes"].items():
            print(f"  {head}: {note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
