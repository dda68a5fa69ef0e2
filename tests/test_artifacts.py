"""One recogniser for every file and directory edgeprune reads or writes (edgeprune.artifacts)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from edgeprune.artifacts import ArtifactError, expect, identify
from edgeprune.baselines.scores import Scores, save_scores
from edgeprune.graph import Graph, GraphSpec


def test_every_kind_is_recognised_by_what_it_holds(tmp_path):
    graph = Graph(GraphSpec(n_layers=1, n_heads=2))
    save_scores(Scores("eap", torch.zeros(graph.num_edges), graph.edges, graph.fingerprint()), tmp_path / "s.safetensors")
    run = tmp_path / "run"
    run.mkdir()
    save_file({"edge_log_alpha": torch.zeros(graph.num_edges)}, str(run / "masks.safetensors"))
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "config.json").write_text("{}")
    save_file({"transformer.h.0.q_read_log_alphas": torch.zeros(2, 2)}, str(ref / "model.safetensors"))
    (tmp_path / "edges.json").write_text(json.dumps([["tok_embeds", "resid_post"]]))
    (tmp_path / "circuit.json").write_text(json.dumps({"graph": graph.fingerprint(), "edges_file": "edges.json"}))
    (tmp_path / "g.json").write_text(json.dumps({"cfg": {}, "nodes": {}, "edges": {}}))
    (tmp_path / "curve.json").write_text(json.dumps({"methods": {}}))
    found = {name: identify(tmp_path / name) for name in
             ("s.safetensors", "run", "run/masks.safetensors", "ref", "edges.json", "circuit.json", "g.json", "curve.json")}
    assert found == {"s.safetensors": "scores", "run": "run", "run/masks.safetensors": "masks", "ref": "reference-run",
                     "edges.json": "edges", "circuit.json": "circuit", "g.json": "eap-ig-graph", "curve.json": "curve"}


def test_anything_else_is_one_line_naming_the_path(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "config.json").write_text('{"model": "gpt2"}')
    (tmp_path / "bad.json").write_text("[1, 2")
    (tmp_path / "empty").mkdir()
    for name, message in (("notes.txt", "not an edgeprune file"), ("config.json", "not a circuit"),
                          ("bad.json", "invalid JSON at line 1"), ("empty", "not a run directory")):
        with pytest.raises(ArtifactError, match=message) as info:
            identify(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
    with pytest.raises(FileNotFoundError, match="no such file"):
        identify(tmp_path / "missing")
    (tmp_path / "edges.json").write_text("[]")
    with pytest.raises(ArtifactError, match="this is an edges.json, but scores wanted"):
        expect(tmp_path / "edges.json", ("scores",), "scores wanted")
