"""Our MViT against the real pytorchvideo MViT: same state dict, same outputs.

Optional: needs a venv with pytorchvideo (not a project dependency), e.g.
    PYTHONPATH=. /path/to/venv/bin/python -m pytest tests/encoder/test_pytorchvideo_equivalence.py
The base-config case runs two 36M-parameter models on [2, 3, 16, 224, 224] (~30 s on 2 cores).
"""

import dataclasses

import pytest
import torch

pytest.importorskip("pytorchvideo")
from pytorchvideo.models.vision_transformers import (
    create_multiscale_vision_transformers,
)

from cmr_search.encoder.mvit import MViT, MViTConfig

TOL = 1e-4

# Two small non-default configs between them exercise every branch that changes the module
# tree or the arithmetic: joint vs separate position tables, no qkv bias, kernels derived
# from strides, explicit kv strides, several heads, another frame count and crop.
SMALL = {
    "small_adaptive": MViTConfig(
        frames=16, crop_size=64, embed_dim=32, depth=4,
        embed_dim_mul=[[1, 2.0], [3, 2.0]], atten_head_mul=[[1, 2.0], [3, 2.0]],
        pool_q_stride_size=[[1, 1, 2, 2], [3, 1, 2, 2]], pool_kv_stride_adaptive=[1, 4, 4],
    ),
    "small_explicit": MViTConfig(
        frames=8, crop_size=96, embed_dim=48, depth=5, num_heads=2, qkv_bias=False,
        sep_pos_embed=False, embed_dim_mul=[[2, 2.0]], atten_head_mul=[[2, 2.0]],
        pool_q_stride_size=[[2, 2, 2, 2]], pool_kv_stride_adaptive=None,
        pool_kv_stride_size=[[0, 1, 4, 4], [1, 1, 4, 4], [2, 1, 2, 2], [3, 1, 2, 2]],
        pool_kvq_kernel=None,
    ),
}


def _lists(value):
    # pytorchvideo concatenates some of these with lists, so tuples will not do.
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def pytorchvideo_model(cfg: MViTConfig) -> torch.nn.Module:
    """pytorchvideo's builder with the arguments that correspond to cfg, head.proj removed."""
    c = {k: _lists(v) for k, v in dataclasses.asdict(cfg).items()}
    model = create_multiscale_vision_transformers(
        spatial_size=c["crop_size"], temporal_size=c["frames"], input_channels=c["in_channels"],
        patch_embed_dim=c["embed_dim"], depth=c["depth"], num_heads=c["num_heads"],
        mlp_ratio=c["mlp_ratio"], qkv_bias=c["qkv_bias"],
        conv_patch_embed_kernel=c["patch_kernel"], conv_patch_embed_stride=c["patch_stride"],
        conv_patch_embed_padding=c["patch_padding"], embed_dim_mul=c["embed_dim_mul"],
        atten_head_mul=c["atten_head_mul"], pool_q_stride_size=c["pool_q_stride_size"],
        pool_kv_stride_adaptive=c["pool_kv_stride_adaptive"],
        pool_kv_stride_size=c["pool_kv_stride_size"], pool_kvq_kernel=c["pool_kvq_kernel"],
        sep_pos_embed=c["sep_pos_embed"], droppath_rate_block=c["droppath_rate"],
        dropout_rate_block=c["dropout_rate"], head_dropout_rate=c["head_dropout_rate"],
    )
    model.head.proj = torch.nn.Identity()
    return model


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Fresh init leaves norms at 1/0 and biases at 0, which would hide a swapped or skipped
    affine; trained weights are not like that."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def compare(cfg: MViTConfig, batch: int) -> float:
    torch.manual_seed(0)
    ref = perturbed(pytorchvideo_model(cfg)).eval()
    ours = MViT(cfg).eval()
    ref_state = ref.state_dict()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in ref_state.items()
    ]
    ours.load_state_dict(ref_state, strict=True)
    x = torch.randn(batch, *cfg.input_shape)
    with torch.inference_mode():
        want, got = ref(x), ours(x)
    assert got.shape == want.shape == (batch, cfg.out_dim)
    diff = (got - want).abs().max().item()
    print(f"max abs diff {diff:.3g} (output max abs {want.abs().max().item():.3g})")
    return diff


def test_hub_config_is_our_default():
    from pytorchvideo.models.hub.vision_transformers import mvit_video_base_config as hub

    cfg = MViTConfig()
    assert hub["spatial_size"] == cfg.crop_size and hub["temporal_size"] == cfg.frames
    for key in ("embed_dim_mul", "atten_head_mul", "pool_q_stride_size",
                "pool_kv_stride_adaptive", "pool_kvq_kernel"):
        assert MViTConfig(**{key: hub[key]}) == cfg, key


def test_base_16x4_matches_pytorchvideo():
    assert compare(MViTConfig(), batch=2) < TOL


@pytest.mark.parametrize("name", list(SMALL))
def test_small_config_matches_pytorchvideo(name):
    assert compare(SMALL[name], batch=3) < TOL


def test_small_config_gradients_match_pytorchvideo():
    cfg = dataclasses.replace(SMALL["small_adaptive"], head_dropout_rate=0.0)
    torch.manual_seed(0)
    ref, ours = perturbed(pytorchvideo_model(cfg)).train(), MViT(cfg).train()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, *cfg.input_shape)
    w = torch.randn(2, cfg.out_dim)
    (ref(x) * w).sum().backward()
    (ours(x) * w).sum().backward()
    ref_grads = {name: p.grad for name, p in ref.named_parameters()}
    # Gradients reach ~1e2 here (shared weights sum over thousands of tokens) and some are
    # exactly zero in theory (key biases cancel in the softmax), so measure every tensor's
    # error against the largest gradient.
    scale = max(g.abs().max().item() for g in ref_grads.values())
    worst = max(
        (p.grad - ref_grads[name]).abs().max().item() for name, p in ours.named_parameters()
    )
    print(f"max abs gradient diff {worst:.3g} (largest gradient {scale:.3g})")
    assert worst < 1e-5 * scale
