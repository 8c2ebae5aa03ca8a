"""Loading the published Lightning checkpoint layout and our own checkpoints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from cmr_search.core.exceptions import InputError
from cmr_search.encoder import load_video_encoder
from cmr_search.encoder.config import load_config
from cmr_search.encoder.video import VideoEncoder

FIXTURE = Path(__file__).parent / "fixtures" / "pytorchvideo_mvit_base_16x4.json"


def _lightning_ckpt(path, module, extra_hparams=None, drop=None):
    state = {f"model.{k}": v for k, v in module.state_dict().items() if k != drop}
    # what a contrastive Lightning module also holds: the text tower and optimizer-side keys
    state["model.text_encoder.embeddings.word_embeddings.weight"] = torch.zeros(4, 3)
    state["model.text_proj.weight"] = torch.zeros(512, 3)
    torch.save({"state_dict": state, "epoch": 3, "global_step": 100,
                "hyper_parameters": extra_hparams or {"lr": 1e-4}}, path)
    return path


def test_published_layout_loads_every_tensor_and_gives_the_same_output(tiny_cfg_file, tmp_path):
    cfg = load_config(tiny_cfg_file)
    torch.manual_seed(0)
    source = VideoEncoder(cfg.vision).eval()
    path = _lightning_ckpt(tmp_path / "cmr_c0.1.ckpt", source)
    loaded = load_video_encoder(path, config=str(tiny_cfg_file))
    report = loaded.load_report
    assert report.complete and len(report.matched) == len(source.state_dict()) and report.ignored == 2
    assert not loaded.training
    x = torch.randn(2, 3, 16, 48, 48)
    with torch.no_grad():
        out = loaded(x)
        assert torch.allclose(out, source(x), atol=1e-6)
    assert out.shape == (2, 512) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    assert loaded.model_id and loaded.preprocess.crop == 48


def test_a_partial_load_is_refused_unless_asked(tiny_cfg_file, tmp_path):
    cfg = load_config(tiny_cfg_file)
    source = VideoEncoder(cfg.vision)
    path = _lightning_ckpt(tmp_path / "part.ckpt", source, drop="video_proj.bias")
    with pytest.raises(InputError, match=r"refusing a partial load: .*1 missing.*video_proj.bias"):
        load_video_encoder(path, config=str(tiny_cfg_file))
    loaded = load_video_encoder(path, config=str(tiny_cfg_file), allow_partial=True)
    assert loaded.load_report.missing == ["video_proj.bias"]


def test_pickled_python_objects_need_explicit_trust(tiny_cfg_file, tmp_path):
    cfg = load_config(tiny_cfg_file)
    path = _lightning_ckpt(tmp_path / "ns.ckpt", VideoEncoder(cfg.vision), extra_hparams=argparse.Namespace(lr=1))
    with pytest.raises(InputError, match="trust"):
        load_video_encoder(path, config=str(tiny_cfg_file))
    assert load_video_encoder(path, config=str(tiny_cfg_file), trust_pickle=True).load_report.complete


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot be read"):
        load_video_encoder(bad)
    with pytest.raises(InputError, match="does not exist"):
        load_video_encoder(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {"cmr_search.encoder.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(InputError, match="model.video_encoder"):
        load_video_encoder(tmp_path / "other.ckpt")


def test_published_key_names_match_pytorchvideo_mvit_base(tmp_path):
    """A checkpoint with exactly pytorchvideo's mvit_base_16x4 names and shapes (the fixture
    was generated from pytorchvideo) plus video_proj loads completely: 377 tensors."""
    params = json.loads(FIXTURE.read_text())["params"]
    state = {f"model.video_encoder.{k}": torch.zeros(shape) for k, shape in params.items()}
    state["model.video_proj.weight"] = torch.zeros(512, 768)
    state["model.video_proj.bias"] = torch.zeros(512)
    path = tmp_path / "published_layout.ckpt"
    torch.save({"state_dict": state}, path)
    loaded = load_video_encoder(path)
    assert loaded.load_report.complete and len(loaded.load_report.matched) == 377
    assert loaded.preprocess.resize == 264 and loaded.preprocess.crop == 224
