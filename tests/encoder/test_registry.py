"""Encoders move between stores: embedding with another store's checkpoint or the published
file registers it, a store has one default model that baselines never take, and a vision
tower without a text tower says so when asked for text search."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from store_data import copy_store

from cmr_search.core.exceptions import InputError
from cmr_search.encoder import Embedder, embed_store
from cmr_search.encoder.embed import TextQueryEncoder
from cmr_search.encoder.registry import EncoderRegistry
from cmr_search.encoder.train import Trainer
from cmr_search.encoder.video import VideoEncoder
from cmr_search.store.config import IndexConfig
from cmr_search.store.embedding_store import EmbeddingStore
from cmr_search.store.search import Searcher, default_model_id

CMR = [sys.executable, "-m", "cmr_search.cli"]


@pytest.fixture()
def site_a(enc_store, tiny_cfg, tmp_path):
    """Store A with an encoder trained in it (one step)."""
    trained = Trainer(enc_store, tiny_cfg, run_dir=tmp_path / "run", progress=False, log=lambda *_: None).fit(max_steps=1)
    return enc_store, trained


@pytest.fixture()
def site_b(ingested, tmp_path):
    """Store B: the same clips, no encoder."""
    return copy_store(ingested[0].root, tmp_path / "b")


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_another_stores_checkpoint_is_registered_and_becomes_the_default(site_a, site_b):
    _, trained = site_a
    report = embed_store(site_b, trained.checkpoint, progress=False)
    registry = EncoderRegistry(site_b)
    assert report.model_id == trained.model_id and report.default_model == trained.model_id
    assert registry.model_ids() == [trained.model_id] and registry.default == trained.model_id
    card = registry.card(trained.model_id)
    assert card["origin"] == "imported" and card["text_tower"] and card["source"] == trained.checkpoint.name
    assert "/" not in card["source"]  # no machine path in the store
    assert _files(site_b / "encoders" / trained.model_id) == ["card.json", "config.json", "model.safetensors"]
    # text search in B uses the registered text tower, the default model without --model-id
    searcher = Searcher(site_b, None, IndexConfig(), encode_text=TextQueryEncoder(site_b))
    assert searcher.model_id == trained.model_id and len(searcher.by_text("dilated LV", 3)) == 3
    # the evaluation's random-init baseline is embedded beside it and never becomes the default
    from cmr_search.evals.baseline import embed_random_baseline

    baseline = embed_random_baseline(site_b, trained.model_id, progress=False)
    assert set(EmbeddingStore.open(site_b).model_ids("studies")) == {trained.model_id, baseline}
    assert default_model_id(EmbeddingStore.open(site_b)) == trained.model_id
    assert registry.card(baseline)["origin"] == "baseline"
    with pytest.raises(InputError, match="baseline"):
        registry.set_default(baseline)
    # the same weights are stored once: registering again adds nothing
    embed_store(site_b, trained.checkpoint, progress=False)
    assert len(registry.model_ids()) == 2


def test_a_trained_encoder_is_carded_in_its_own_store(site_a):
    root, trained = site_a
    card = EncoderRegistry(root).card(trained.model_id)
    assert card["origin"] == "trained" and card["source"] == "run run" and card["text_tower"]
    assert EncoderRegistry(root).default is None  # nothing embedded yet
    embed_store(root, trained.checkpoint, progress=False)
    assert EncoderRegistry(root).default == trained.model_id


def test_a_second_model_embedded_leaves_the_default_unless_asked(site_a, tiny_cfg, tmp_path):
    root, first = site_a
    embed_store(root, first.checkpoint, progress=False)
    second = Trainer(root, tiny_cfg, run_dir=tmp_path / "run2", progress=False,
                     log=lambda *_: None).fit(max_steps=2)
    report = embed_store(root, second.checkpoint, progress=False)
    assert report.default_model == first.model_id
    assert default_model_id(EmbeddingStore.open(root)) == first.model_id
    report = embed_store(root, second.checkpoint, progress=False, set_default=True)
    assert report.default_model == second.model_id and report.clips_embedded == 0


def _published(tiny_cfg, path):
    torch.manual_seed(3)
    module = VideoEncoder(tiny_cfg.vision)
    state = {f"model.{k}": v for k, v in module.state_dict().items()}  # the Lightning module's names
    torch.save({"state_dict": state, "hyper_parameters": {"lr": 1e-4}}, path)
    return path


def test_the_published_checkpoint_is_registered_as_a_vision_tower(site_b, tiny_cfg, tiny_cfg_file, tmp_path):
    ckpt = _published(tiny_cfg, tmp_path / "cmr_c0.1.ckpt")
    direct = Embedder(ckpt, device="cpu", config=str(tiny_cfg_file))
    report = embed_store(site_b, ckpt, progress=False, config=str(tiny_cfg_file))
    registry = EncoderRegistry(site_b)
    assert report.model_id == direct.model_id and registry.default == report.model_id
    folder = site_b / "encoders" / report.model_id
    assert _files(folder) == ["card.json", "config.json", "video.safetensors"]
    card = registry.card(report.model_id)
    assert card["origin"] == "published" and not card["text_tower"] and card["source"] == "cmr_c0.1.ckpt"
    # the registered folder embeds exactly as the file did, without the file
    ckpt.unlink()
    clips = np.random.default_rng(0).integers(0, 255, (3, 16, 128, 128), dtype=np.uint8)
    registered = Embedder(folder, device="cpu")
    assert registered.model_id == report.model_id and registered.pool is None
    assert torch.allclose(registered.encode_clips(clips), direct.encode_clips(clips), atol=1e-6)
    # scan-to-scan works; text search says why it cannot
    searcher = Searcher(site_b, None, IndexConfig(), encode_text=TextQueryEncoder(site_b))
    uid = EmbeddingStore.open(site_b).study_rows(report.model_id, ["study_uid"])["study_uid"][0].as_py()
    assert len(searcher.by_study(uid, 3)) == 3
    with pytest.raises(InputError, match="without a text tower"):
        searcher.by_text("dilated LV", 3)


def test_an_unregistered_model_says_how_to_register_it(site_b):
    with pytest.raises(InputError, match="cmr embed --checkpoint"):
        TextQueryEncoder(site_b).tower("0123456789abcdef")


def test_cli_encoders_list_show_and_set_default(site_a, tiny_cfg, tmp_path):
    root, first = site_a
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    embed_store(root, first.checkpoint, progress=False)
    second = Trainer(root, tiny_cfg, run_dir=tmp_path / "run2", progress=False, log=lambda *_: None).fit(max_steps=2)
    out = subprocess.run([*CMR, "embed", "--store", str(root), "--checkpoint", str(second.checkpoint)],
                         capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0 and f"default model stays {first.model_id}" in out.stderr, out.stderr
    listed = json.loads(subprocess.run([*CMR, "encoders", "list", "--store", str(root), "--json"], capture_output=True,
                                       text=True, env=env, check=True).stdout)
    assert {r["model_id"]: (r["default"], r["studies"], r["text_tower"]) for r in listed} == {
        first.model_id: (True, 10, True), second.model_id: (False, 10, True)}
    out = subprocess.run([*CMR, "encoders", "set-default", second.model_id, "--store", str(root)],
                         capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0 and EncoderRegistry(root).default == second.model_id, out.stderr
    shown = json.loads(subprocess.run([*CMR, "encoders", "show", second.model_id, "--store", str(root), "--json"],
                                      capture_output=True, text=True, env=env, check=True).stdout)
    assert shown["default"] and shown["card"]["step"] == 2 and shown["config"]["dim"] == 512
    bad = subprocess.run([*CMR, "encoders", "set-default", "nope", "--store", str(root)],
                         capture_output=True, text=True, env=env, check=False)
    assert bad.returncode == 2 and "no encoder 'nope'" in bad.stderr
