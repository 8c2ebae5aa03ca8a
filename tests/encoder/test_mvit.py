"""The MViT video encoder: pytorchvideo-compatible parameters, shapes, gradients, input checks.

Equivalence of the outputs with pytorchvideo itself is in test_pytorchvideo_equivalence.py
(needs a venv with pytorchvideo); this file needs only torch.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from cmr_search.encoder.mvit import MViT, MViTConfig, mvit_param_shapes

FIXTURE = Path(__file__).parent / "fixtures" / "pytorchvideo_mvit_base_16x4.json"

# Base architecture scaled down for CPU: same stage layout (q pooled at blocks 1 and 3, kv
# strides adapted from 4, then one block at the last scale), a sixth of the widths. A q pool
# in the very last block would get no gradient: only the class token, never pooled, is read.
SMALL = {
    "frames": 16, "crop_size": 64, "embed_dim": 16, "depth": 5,
    "embed_dim_mul": [[1, 2.0], [3, 2.0]], "atten_head_mul": [[1, 2.0], [3, 2.0]],
    "pool_q_stride_size": [[1, 1, 2, 2], [3, 1, 2, 2]], "pool_kv_stride_adaptive": [1, 4, 4],
}


def small(**changes) -> MViTConfig:
    return MViTConfig(**{**SMALL, **changes})


def tiny(**changes) -> MViTConfig:
    """For tests of mechanics, where the clip size does not matter: 8 x 32 x 32."""
    return small(frames=8, crop_size=32, **changes)


def clips(cfg: MViTConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *cfg.input_shape, generator=torch.Generator().manual_seed(seed))


def test_base_state_dict_is_pytorchvideo_mvit_base_16x4():
    fixture = json.loads(FIXTURE.read_text())
    model = MViT(MViTConfig())
    state = model.state_dict()
    # Same names in the same order, same shapes, nothing extra (no head.*), no buffers.
    assert [(k, list(v.shape)) for k, v in state.items()] == list(fixture["params"].items())
    assert sum(p.numel() for p in model.parameters()) == fixture["n_params"] == 36_303_072
    assert len(list(model.parameters())) == len(state)
    assert model.out_dim == MViTConfig().out_dim == 768
    assert mvit_param_shapes() == fixture["params"]


def test_config_from_plain_json_dict():
    base = MViTConfig()
    cfg = MViTConfig(**json.loads(json.dumps(dataclasses.asdict(base))))
    assert cfg == base
    assert MViTConfig(**SMALL).pool_q_stride_size == ((1, 1, 2, 2), (3, 1, 2, 2))
    assert small().out_dim == 64


def test_small_forward_shape_and_eval_determinism():
    cfg = small()
    model = MViT(cfg).eval()
    x = clips(cfg, batch=2)
    with torch.inference_mode():
        a, b = model(x), model(x)
    assert a.shape == (2, cfg.out_dim) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    # Clips are encoded independently of their batch mates.
    with torch.inference_mode():
        torch.testing.assert_close(model(x[1:2]), a[1:2], rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter():
    cfg = small(droppath_rate=0.1, dropout_rate=0.1)
    model = MViT(cfg).train()
    out = model(clips(cfg))
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_stochastic_depth_and_dropout_only_in_training():
    cfg = tiny(droppath_rate=0.5)
    model = MViT(cfg)
    x = clips(cfg)
    torch.manual_seed(1)
    first = model.train()(x)
    second = model(x)
    assert not torch.equal(first, second)
    model.eval()
    assert torch.equal(model(x), model(x))


def test_gradient_checkpointing_changes_nothing_but_memory():
    cfg = tiny(head_dropout_rate=0.0)
    plain = MViT(cfg).train()
    ckpt = MViT(dataclasses.replace(cfg, gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x = clips(cfg)
    outs = []
    for model in (plain, ckpt):
        out = model(x)
        out.square().sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize(
    "frames,crop,extra",
    [(8, 96, {}), (12, 80, {"sep_pos_embed": False}), (4, 112, {"num_heads": 2})],
)
def test_other_clip_sizes_from_config(frames, crop, extra):
    cfg = small(frames=frames, crop_size=crop, **extra)
    model = MViT(cfg).eval()
    grid = (frames // 2, crop // 4, crop // 4)
    assert cfg.patch_grid == grid
    pos = model.cls_positional_encoding
    if cfg.sep_pos_embed:
        assert pos.pos_embed_spatial.shape == (1, grid[1] * grid[2], cfg.embed_dim)
        assert pos.pos_embed_temporal.shape == (1, grid[0], cfg.embed_dim)
    else:
        assert pos.pos_embed.shape == (1, grid[0] * grid[1] * grid[2] + 1, cfg.embed_dim)
    with torch.inference_mode():
        assert model(clips(cfg)).shape == (2, cfg.out_dim)


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 16, 96, 96), (2, 3, 8, 64, 64), (2, 1, 16, 64, 64), (3, 16, 64, 64), (2, 3, 16, 64, 80)],
)
def test_wrong_input_shape_says_what_was_expected(shape):
    model = MViT(small())
    with pytest.raises(ValueError, match=r"expects clips of shape \[B, 3, 16, 64, 64\]"):
        model(torch.zeros(shape))


def test_config_rejects_what_pytorchvideo_would_fail_on_later():
    with pytest.raises(ValueError, match="does not tile"):
        small(crop_size=98)  # conv gives 25 columns, position table 24
    with pytest.raises(ValueError, match="not both"):
        small(pool_kv_stride_size=[[0, 1, 2, 2]])
    with pytest.raises(ValueError, match="block index"):
        small(pool_q_stride_size=[[9, 1, 2, 2]])
