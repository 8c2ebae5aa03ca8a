"""The text tower: packaged weights with a checked hash, mean pooling, frozen layers."""

from __future__ import annotations

import shutil

import pytest
import torch

from cmr_search.core.exceptions import InputError
from cmr_search.encoder import load_text_encoder
from cmr_search.encoder.text import TextConfig, TextEncoder, default_text_model_dir, split_sentences


@pytest.fixture(scope="module")
def text():
    return load_text_encoder()


def test_encode_gives_unit_vectors_and_is_deterministic(text):
    out = text.encode(["Severe LV dilatation with apical thrombus.", "Normal study.", "Normal study."])
    assert out.shape == (3, 512) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out[1], out[2])
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(TypeError, match="list of strings"):
        text.encode("one string")


def test_first_layers_are_frozen():
    enc = TextEncoder(TextConfig(frozen_layers=4))
    assert not any(p.requires_grad for p in enc.bert.embeddings.parameters())
    assert not any(p.requires_grad for layer in enc.bert.encoder.layer[:4] for p in layer.parameters())
    assert all(p.requires_grad for layer in enc.bert.encoder.layer[4:] for p in layer.parameters())
    assert all(p.requires_grad for p in enc.text_proj.parameters())


def test_weights_with_the_wrong_hash_are_refused(tmp_path):
    folder = tmp_path / "bert"
    shutil.copytree(default_text_model_dir(), folder)
    with pytest.raises(InputError, match="sha256"):
        TextEncoder(TextConfig(model=str(folder), sha256="0" * 64))
    assert TextEncoder(TextConfig(model=str(folder), sha256=None)).text_proj.out_features == 512
    with pytest.raises(InputError, match="config.json"):
        TextEncoder(TextConfig(model=str(tmp_path), sha256=None))


def test_sentences_split_on_punctuation_and_lines():
    assert split_sentences("LVEF 35%. No thrombus!\nImpression: DCM") == ["LVEF 35%.", "No thrombus!", "Impression: DCM"]
