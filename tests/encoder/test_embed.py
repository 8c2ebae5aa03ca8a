"""`cmr embed`: views and studies tables, resumable, and encode_study for new studies."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cmr_search.encoder import Embedder, embed_store, encode_study
from cmr_search.encoder.train import Trainer
from cmr_search.encoder.video import VideoEncoder
from cmr_search.store import ClipStore
from cmr_search.store.embedding_store import EmbeddingStore


@pytest.fixture()
def trained(enc_store, tiny_cfg, tmp_path):
    return Trainer(enc_store, tiny_cfg, run_dir=tmp_path / "run", progress=False, log=lambda *_: None).fit(max_steps=1)


def test_embed_writes_every_clip_and_study_and_resumes(enc_store, trained):
    report = embed_store(enc_store, trained.checkpoint, progress=False)
    store = ClipStore.open(enc_store)
    tables = EmbeddingStore(store)
    n_clips = store.count_clips()
    assert report.model_id == trained.model_id and report.clips_embedded == n_clips and report.studies == 10
    views = tables.view_rows(trained.model_id)
    studies = tables.study_rows(trained.model_id)
    assert views.num_rows == n_clips and studies.num_rows == 10
    assert views.schema.field("vector").type.list_size == 512
    v = EmbeddingStore.vectors(views)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    assert set(views["study_uid"].to_pylist()) == store.study_uids()
    row = studies.to_pylist()[0]
    assert abs(sum(row["attention"]) - 1) < 1e-5 and len(row["clip_ids"]) == row["n_views"]
    again = embed_store(enc_store, trained.checkpoint, progress=False)
    assert again.clips_embedded == 0 and again.clips_skipped == n_clips
    assert tables.view_rows(trained.model_id).num_rows == n_clips  # no duplicates


def test_encode_study_matches_the_stored_embeddings(enc_store, trained):
    embed_store(enc_store, trained.checkpoint, progress=False)
    store = ClipStore.open(enc_store)
    tables = EmbeddingStore(store)
    study = tables.study_rows(trained.model_id).to_pylist()[0]
    clips = [store.get_clip(cid)[1] for cid in study["clip_ids"]]
    views, pooled, attention = encode_study(clips, Embedder(trained.checkpoint))
    by_path = encode_study(clips, str(trained.checkpoint))  # a checkpoint folder loads its Embedder
    assert np.allclose(by_path[1], pooled, atol=1e-6)
    assert views.shape == (len(clips), 512) and pooled.shape == (512,)
    assert np.allclose(pooled, study["vector"], atol=1e-5)
    assert np.allclose(attention, study["attention"], atol=1e-5)


def test_compiled_embedder_pads_batches_to_one_shape(trained, monkeypatch):
    shapes = []

    def fake_compile(module):  # the eager module, recording the batch shapes a compiled graph would see
        def run(x):
            shapes.append(tuple(x.shape))
            return module(x)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    clips = np.random.default_rng(1).integers(0, 255, (7, 16, 128, 128), dtype=np.uint8)
    eager = Embedder(trained.checkpoint, device="cpu").encode_clips(clips)
    padded = Embedder(trained.checkpoint, device="cpu", compile=True, compile_batch=4).encode_clips(clips)
    assert {s[0] for s in shapes} == {4} and len(shapes) == 2  # 4 + 3 padded to 4
    assert padded.shape == eager.shape and torch.allclose(padded, eager, atol=1e-5)


def test_the_published_layout_embeds_with_mean_pooling(enc_store, tiny_cfg_file, tmp_path):
    from cmr_search.encoder.config import load_config

    cfg = load_config(tiny_cfg_file)
    module = VideoEncoder(cfg.vision)
    ckpt = tmp_path / "pub.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in module.state_dict().items()}}, ckpt)
    embedder = Embedder(ckpt, device="cpu", config=str(tiny_cfg_file))
    clips = np.random.default_rng(0).integers(0, 255, (3, 16, 128, 128), dtype=np.uint8)
    views, study, attention = encode_study(clips, embedder)
    assert np.allclose(attention, 1 / 3)
    mean = views.mean(0)
    assert np.allclose(study, mean / np.linalg.norm(mean), atol=1e-6)


def test_cli_train_then_embed(enc_store, tiny_cfg_file):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    cmr = [sys.executable, "-m", "cmr_search.cli"]
    out = subprocess.run([*cmr, "train-encoder", "--store", str(enc_store), "--config", str(tiny_cfg_file),
                          "--max-steps", "1", "--json"], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    trained = json.loads(out.stdout)
    out = subprocess.run([*cmr, "embed", "--store", str(enc_store), "--json"], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    embedded = json.loads(out.stdout)
    assert embedded["model_id"] == trained["model_id"] and embedded["studies"] == 10
    query = "severe LV dilatation with apical thrombus"
    out = subprocess.run([*cmr, "search", "--store", str(enc_store), "--text", query, "-k", "3", "--json"],
                         capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["model_id"] == trained["model_id"] and len(found["hits"]) == 3
    # the CLI ranks by the model's own text tower, the query composed from its findings
    # (encoder/query.py), against the stored study embeddings
    from cmr_search.encoder import load_text_encoder
    from cmr_search.encoder.query import compose_queries
    from cmr_search.findings.parse import FindingParser
    from cmr_search.store.embedding_store import EmbeddingStore

    store = EmbeddingStore.open(enc_store)
    rows = store.study_rows(trained["model_id"], ["study_uid", "vector"])
    tower = load_text_encoder(enc_store / "encoders" / trained["model_id"])
    q = compose_queries([query], lambda texts: tower.encode(texts).numpy(), FindingParser())[0]
    best = np.argsort(-(EmbeddingStore.vectors(rows) @ q))[:3]
    assert [h["study_uid"] for h in found["hits"]] == [rows["study_uid"][int(i)].as_py() for i in best]
    bad = subprocess.run([*cmr, "embed", "--store", str(enc_store), "--checkpoint", str(enc_store / "nope")],
                         capture_output=True, text=True, env=env, check=False)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_text_tower_of_a_trained_checkpoint(trained):
    from cmr_search.encoder import load_checkpoint, load_text_encoder

    text = load_text_encoder(trained.checkpoint)
    assert text.model_id == trained.model_id
    model, *_ = load_checkpoint(trained.checkpoint)
    query = ["severe LV dilatation with apical thrombus"]
    assert torch.allclose(text.encode(query), model.text.encode(query), atol=1e-6)
