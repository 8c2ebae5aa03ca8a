"""``cmr train-text``: a text tower trained against a locked model's stored embeddings is a
model of its own that searches the video model's vectors; training lowers the loss, resumes
exactly, and works for the published vision-only layout end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from store_data import copy_store
from test_registry import _published

from cmr_search.core.exceptions import InputError
from cmr_search.core.layout import StoreLayout
from cmr_search.encoder import embed_store
from cmr_search.encoder.config import load_text_align_config
from cmr_search.encoder.embed import TextQueryEncoder
from cmr_search.encoder.registry import EncoderRegistry
from cmr_search.encoder.text import TextConfig, TextEncoder
from cmr_search.encoder.train import Trainer
from cmr_search.encoder.train_text import TextTrainer
from cmr_search.store.config import IndexConfig
from cmr_search.store.embedding_store import EmbeddingStore
from cmr_search.store.search import Searcher

CMR = [sys.executable, "-m", "cmr_search.cli"]


def tiny_text_cfg(**over):
    """The one-layer recipe (the top layer trains, not only the projection) made small
    enough for the 10-study test cohort."""
    cfg = load_text_align_config("minilm_top1")
    small = {"studies_per_batch": 4, "max_steps": 6, "warmup_steps": 1, "checkpoint_every": 3, "eval_every": 3,
             "val_fraction": 0.2, "lr": 1e-3, "proj_lr": 1e-2}
    return replace(cfg, **small | over)


@pytest.fixture()
def embedded(enc_store, tiny_cfg, tmp_path):
    """A store embedded with a tiny encoder trained in it (one step): (root, model_id)."""
    trained = Trainer(enc_store, tiny_cfg, run_dir=tmp_path / "run", progress=False, log=lambda *_: None).fit(max_steps=1)
    embed_store(enc_store, trained.checkpoint, progress=False)
    return enc_store, trained.model_id


@pytest.fixture()
def site_b(ingested, tmp_path):
    """A store with clips and no encoder."""
    return copy_store(ingested[0].root, tmp_path / "b")


def quiet(*_):
    """A log that prints nothing."""


@pytest.mark.parametrize("frozen", [0, 5, 6])
def test_the_cached_trunk_and_the_top_layers_give_the_towers_own_output(frozen):
    tower = TextEncoder(TextConfig(frozen_layers=frozen)).eval()
    texts = ["Severe LV dilatation with apical thrombus. LVEF 25%.", "No thrombus.", ""]
    with torch.no_grad():
        assert torch.allclose(tower.top(tower.trunk(texts)), tower.encode(texts), atol=1e-5)


def test_the_packaged_recipes_load_and_a_typo_is_refused(tmp_path):
    assert load_text_align_config("minilm_cpu").text.frozen_layers == 6  # the projection alone
    assert load_text_align_config("minilm_top1").text.frozen_layers == 5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"text": {"frozen_layer": 5}}))
    with pytest.raises(InputError, match="frozen_layer"):
        load_text_align_config(bad)
    with pytest.raises(InputError, match="minilm_cpu"):
        load_text_align_config("nope")


def _loss_on(trainer: TextTrainer, step: int) -> float:
    batch = trainer.batches[step]
    trainer.model.eval()
    out = trainer.step_once(batch)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.model.train()
    return float(out["loss"].detach())


def test_training_lowers_the_loss_and_registers_a_model_on_the_video_models_vectors(embedded, tmp_path):
    root, video = embedded
    trainer = TextTrainer(root, tiny_text_cfg(max_steps=12), video, run_dir=tmp_path / "text", progress=False, log=quiet)
    before = _loss_on(trainer, 0)
    result = trainer.fit()
    assert _loss_on(trainer, 0) < before
    assert result.step == 12 and "R@10" in result.val
    rows = (tmp_path / "text" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 13 and "val_R@5" in rows[0]
    text_model = result.model_id
    registry = EncoderRegistry(root)
    card = registry.card(text_model)
    assert card["origin"] == "aligned" and card["video_model"] == video and card["text_tower"]
    # the default was the video model: the aligned model (same vectors, a text tower) takes it
    assert registry.default == text_model
    layout = StoreLayout(root)
    assert layout.vectors_model_id(text_model) == video and layout.vectors_model_id(video) == video
    # its vectors are the video model's, never copied
    tables = EmbeddingStore.open(root)
    assert set(tables.model_ids("studies")) == {video}
    assert tables.rows("studies", text_model, ["study_uid"]).num_rows == 10
    weights = load_file(root / "encoders" / text_model / "model.safetensors")
    assert not any(k.startswith("video.") for k in weights) and "logit_scale" in weights
    # text search with it ranks the video model's studies by its own text tower
    encode = TextQueryEncoder(root)
    hits = Searcher(root, text_model, IndexConfig(), encode_text=encode).by_text("dilated LV with thrombus", 5)
    query = encode(text_model, ["dilated LV with thrombus"])[0]
    vectors = {r["study_uid"]: r["vector"] for r in tables.study_rows(video, ["study_uid", "vector"]).to_pylist()}
    expected = sorted(vectors, key=lambda u: -float(torch.tensor(vectors[u]) @ torch.tensor(query)))[:5]
    assert [h.study_uid for h in hits] == expected
    # the video model's own text tower is a different one
    assert not torch.allclose(torch.tensor(encode(video, ["dilated LV"])), torch.tensor(encode(text_model, ["dilated LV"])))


def test_an_aligned_model_moves_to_another_store_with_its_video_model(embedded, site_b, tmp_path):
    root, video = embedded
    text_model = TextTrainer(root, tiny_text_cfg(max_steps=2), video, run_dir=tmp_path / "text", progress=False,
                             log=quiet).fit().model_id
    report = embed_store(site_b, root / "encoders" / text_model, progress=False)
    registry = EncoderRegistry(site_b)
    # the video model came along (it embeds), the rows are its, the aligned model is the default
    assert set(registry.model_ids()) == {video, text_model} and report.model_id == text_model
    assert registry.card(text_model)["video_model"] == video and registry.default == text_model
    assert set(EmbeddingStore.open(site_b).model_ids("studies")) == {video}
    assert (site_b / "encoders" / text_model / "VECTORS").read_text().strip() == video
    hits = Searcher(site_b, None, IndexConfig(), encode_text=TextQueryEncoder(site_b)).by_text("dilated LV", 3)
    assert len(hits) == 3


def test_resume_is_exact(embedded, tmp_path):
    root, video = embedded
    cfg = tiny_text_cfg()
    straight = TextTrainer(root, cfg, video, run_dir=tmp_path / "a", progress=False, log=quiet)
    straight.fit()
    first = TextTrainer(root, cfg, video, run_dir=tmp_path / "b", progress=False, log=quiet)
    first.fit(max_steps=3)  # stops at 3 as a killed run would have, checkpoint at 3
    resumed = TextTrainer(root, cfg, video, run_dir=tmp_path / "b", resume=True, progress=False, log=quiet)
    assert resumed.step == 3
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="already holds a run"):
        TextTrainer(root, cfg, video, run_dir=tmp_path / "b", progress=False, log=quiet)
    with pytest.raises(InputError, match="another recipe"):
        TextTrainer(root, replace(cfg, lr=5e-4), video, run_dir=tmp_path / "b", resume=True, progress=False, log=quiet)


def test_the_published_layout_goes_from_embed_to_text_search(site_b, tiny_cfg, tiny_cfg_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    ckpt = _published(tiny_cfg, tmp_path / "cmr_c0.1.ckpt")
    out = subprocess.run([*CMR, "embed", "--store", str(site_b), "--checkpoint", str(ckpt), "--config",
                          str(tiny_cfg_file)], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    video = EncoderRegistry(site_b).default
    # before: the vision tower has no text tower, and says how to get one
    refused = subprocess.run([*CMR, "search", "--store", str(site_b), "--text", "dilated LV"],
                             capture_output=True, text=True, env=env, check=False)
    assert refused.returncode == 2 and "cmr train-text" in refused.stderr, refused.stderr
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({k: v for k, v in tiny_text_cfg().to_dict().items() if k != "name"}))
    out = subprocess.run([*CMR, "train-text", "--store", str(site_b), "--config", str(recipe), "--max-steps", "3"],
                         capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    registry = EncoderRegistry(site_b)
    text_model = registry.default
    assert text_model != video and registry.card(text_model)["video_model"] == video
    # text search through the CLI and through the API give the same hits
    cli = json.loads(subprocess.run([*CMR, "search", "--store", str(site_b), "--text", "severely dilated LV", "-k", "5",
                                     "--json"], capture_output=True, text=True, env=env, check=True).stdout)
    from fastapi.testclient import TestClient

    from cmr_search.api.app import create_app
    from cmr_search.api.auth import KeyRing
    from cmr_search.api.settings import ServeSettings

    key, _ = KeyRing(site_b).create("read", "tests")
    app = create_app(ServeSettings(store=site_b), warm_in_background=False)
    with TestClient(app) as client:
        api = client.post("/search/text", json={"query": "severely dilated LV", "k": 5},
                          headers={"Authorization": f"Bearer {key}"}).json()
    assert [h["study_uid"] for h in cli["hits"]] == [h["study_uid"] for h in api["hits"]]
    assert api["model_id"] == text_model
    # the list says which video model it builds on
    listed = json.loads(subprocess.run([*CMR, "encoders", "list", "--store", str(site_b), "--json"],
                                       capture_output=True, text=True, env=env, check=True).stdout)
    assert {r["model_id"]: r["video_model"] for r in listed} == {video: None, text_model: video}
    # the evaluation runs on it as on a jointly trained model: text retrieval, zero-shot, heads
    done = subprocess.run([*CMR, "eval", "--store", str(site_b), "--out", str(tmp_path / "eval"), "--fractions", "1",
                           "--seeds", "1", "--map", "pca", "-k", "3", "--json"],
                          capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(done.stdout)
    assert metrics["run"]["models"]["contrastive"] == text_model
    assert metrics["text_retrieval"]["own_report"]["pool"] == 10
    assert metrics["zero_shot"]["model_id"] == text_model and metrics["zero_shot"]["labels"]


def test_another_local_bert_folder_can_be_the_text_tower(embedded, tmp_path):
    from cmr_search.encoder.text import default_text_model_dir

    root, video = embedded
    cfg = tiny_text_cfg(max_steps=2)
    cfg.text = replace(cfg.text, model=str(default_text_model_dir()), sha256=None)  # what --text-model sets
    text_model = TextTrainer(root, cfg, video, run_dir=tmp_path / "text", progress=False, log=quiet).fit().model_id
    assert EncoderRegistry(root).config(text_model).text.model == str(default_text_model_dir())
    assert TextQueryEncoder(root)(text_model, ["dilated LV"]).shape == (1, 512)
