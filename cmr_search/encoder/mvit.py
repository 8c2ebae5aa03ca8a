"""Multiscale Vision Transformer (MViT, pooling attention) for cine clips, in plain PyTorch.

The module tree mirrors pytorchvideo's ``create_multiscale_vision_transformers`` so that
``state_dict()`` names and shapes are identical to pytorchvideo's ``mvit_base_16x4`` with
``head.proj`` replaced by ``nn.Identity`` (the head then holds no parameters). That is the
layout of the published cmr_transformer checkpoint (under ``model.video_encoder.*``), which
therefore loads with ``strict=True`` once the prefix is stripped. Arithmetic quirks of
pytorchvideo (width rounding, kv-stride schedule, LayerNorm eps 1e-5 after attention
pooling but 1e-6 elsewhere) are reproduced on purpose: changing them changes the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

Grid = list[int]  # token grid [T, H, W], cls token excluded


def _tuple(value: Any) -> Any:
    """Lists (from JSON) to tuples, recursively, so configs compare and hash cleanly."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuple(v) for v in value)
    return value


@dataclass
class MViTConfig:
    """Hyper-parameters of the MViT video encoder; defaults are pytorchvideo's mvit_base_16x4.

    Constructible from a plain dict (``MViTConfig(**json.load(f))``); lists become tuples.
    """

    # Input clip: frames per clip, square crop side in pixels, image channels.
    frames: int = 16
    crop_size: int = 224
    in_channels: int = 3
    # Token width after patch embedding (pytorchvideo: patch_embed_dim).
    embed_dim: int = 96
    # Number of transformer blocks.
    depth: int = 16
    # Attention heads in the first block (later multiplied by atten_head_mul).
    num_heads: int = 1
    # MLP hidden width = int(block input width * mlp_ratio).
    mlp_ratio: float = 4.0
    # Whether the q, k and v projections carry a bias.
    qkv_bias: bool = True
    # Conv3d patch embedding (T, H, W) kernel, stride and padding.
    patch_kernel: tuple[int, int, int] = (3, 7, 7)
    patch_stride: tuple[int, int, int] = (2, 4, 4)
    patch_padding: tuple[int, int, int] = (1, 3, 3)
    # [[block, multiplier], ...]: widths / head counts multiply from that block on.
    embed_dim_mul: tuple[tuple[int, float], ...] = ((1, 2.0), (3, 2.0), (14, 2.0))
    atten_head_mul: tuple[tuple[int, float], ...] = ((1, 2.0), (3, 2.0), (14, 2.0))
    # [[block, stride_t, stride_h, stride_w], ...]: query pooling, i.e. where the grid shrinks.
    pool_q_stride_size: tuple[tuple[int, int, int, int], ...] = (
        (1, 1, 2, 2),
        (3, 1, 2, 2),
        (14, 1, 2, 2),
    )
    # Key/value pooling stride of block 0, divided by the q stride wherever q is pooled.
    pool_kv_stride_adaptive: tuple[int, int, int] | None = (1, 8, 8)
    # Explicit [[block, st, sh, sw], ...] kv strides; only when pool_kv_stride_adaptive is None.
    pool_kv_stride_size: tuple[tuple[int, int, int, int], ...] | None = None
    # Kernel of the q/k/v pooling convs; None derives it from the stride (s + 1 if s > 1).
    pool_kvq_kernel: tuple[int, int, int] | None = (3, 3, 3)
    # Separate spatial + temporal (+ class) position embeddings instead of one joint table.
    sep_pos_embed: bool = True
    # LayerNorm eps of the block / final norms (pytorchvideo passes 1e-6) ...
    norm_eps: float = 1e-6
    # ... and of the norms after q/k/v pooling (pytorchvideo leaves torch's default 1e-5).
    pool_norm_eps: float = 1e-5
    # Stochastic depth: per-block drop-path rate rises linearly from 0 to this (training only).
    droppath_rate: float = 0.0
    # Dropout after position embedding, attention projection and MLP layers (training only).
    dropout_rate: float = 0.0
    # Dropout on the class-token output; pytorchvideo's head applies it before head.proj, so
    # a checkpoint fine-tuned through that head was trained with it (training only).
    head_dropout_rate: float = 0.5
    # Recompute block activations in the backward pass to save memory (training only).
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in (
            "patch_kernel", "patch_stride", "patch_padding", "embed_dim_mul", "atten_head_mul",
            "pool_q_stride_size", "pool_kv_stride_adaptive", "pool_kv_stride_size",
            "pool_kvq_kernel",
        ):
            setattr(self, name, _tuple(getattr(self, name)))
        if self.pool_kv_stride_adaptive is not None and self.pool_kv_stride_size is not None:
            raise ValueError("set pool_kv_stride_adaptive or pool_kv_stride_size, not both")
        # Multipliers may name index depth (the output width); strides only real blocks.
        for name, last in (("embed_dim_mul", self.depth), ("atten_head_mul", self.depth),
                           ("pool_q_stride_size", self.depth - 1),
                           ("pool_kv_stride_size", self.depth - 1)):
            for entry in getattr(self, name) or ():
                if not 0 <= int(entry[0]) <= last:
                    raise ValueError(f"{name}: block index {entry[0]} outside 0..{last}")
        # pytorchvideo sizes the position tables as input // stride; the conv must agree,
        # or the embedding addition fails at the first forward.
        for n, k, s, p in zip(
            self.input_shape[1:], self.patch_kernel, self.patch_stride, self.patch_padding
        ):
            if (n + 2 * p - k) // s + 1 != n // s:
                raise ValueError(
                    f"patch conv (kernel {self.patch_kernel}, stride {self.patch_stride}, "
                    f"padding {self.patch_padding}) does not tile input {self.input_shape[1:]}"
                )

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """Expected per-clip input shape (C, T, H, W)."""
        return (self.in_channels, self.frames, self.crop_size, self.crop_size)

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        """Token grid (T, H, W) after patch embedding."""
        return tuple(n // s for n, s in zip(self.input_shape[1:], self.patch_stride))

    @property
    def out_dim(self) -> int:
        """Width of the output feature (768 for the base config)."""
        return _block_specs(self)[-1]["dim_out"]


def _round_width(width, multiplier, min_width=8, divisor=8):
    # pytorchvideo.layers.utils.round_width (ceil=False), kept verbatim: its min_width=8
    # default silently applies to the divisor used for dim_out, and that sets the widths.
    if not multiplier:
        return width
    width *= multiplier
    min_width = min_width or divisor
    width_out = max(min_width, int(width + divisor / 2) // divisor * divisor)
    if width_out < 0.9 * width:
        width_out += divisor
    return int(width_out)


def _block_specs(cfg: MViTConfig) -> list[dict[str, Any]]:
    """Per-block widths, heads and pooling, following create_multiscale_vision_transformers."""
    depth = cfg.depth
    dim_mul, head_mul = [1.0] * (depth + 1), [1.0] * (depth + 1)
    for i, m in cfg.embed_dim_mul:
        dim_mul[int(i)] = float(m)
    for i, m in cfg.atten_head_mul:
        head_mul[int(i)] = float(m)

    def kernel_for(stride):
        if cfg.pool_kvq_kernel is not None:
            return list(cfg.pool_kvq_kernel)
        return [s + 1 if s > 1 else s for s in stride]

    stride_q: list[list[int]] = [[] for _ in range(depth)]
    kernel_q: list[list[int]] = [[] for _ in range(depth)]
    for i, *stride in cfg.pool_q_stride_size:
        stride_q[i], kernel_q[i] = list(stride), kernel_for(stride)

    kv_sizes = [list(e) for e in cfg.pool_kv_stride_size or ()]
    if cfg.pool_kv_stride_adaptive is not None:
        stride = list(cfg.pool_kv_stride_adaptive)
        for i in range(depth):
            if stride_q[i]:
                stride = [max(s // q, 1) for s, q in zip(stride, stride_q[i])]
            kv_sizes.append([i, *stride])
    stride_kv: list[list[int]] = [[] for _ in range(depth)]
    kernel_kv: list[list[int]] = [[] for _ in range(depth)]
    for i, *stride in kv_sizes:
        stride_kv[i], kernel_kv[i] = list(stride), kernel_for(stride)

    drop = torch.linspace(0, cfg.droppath_rate, depth, device="cpu").tolist()
    specs, heads, dim = [], cfg.num_heads, cfg.embed_dim
    for i in range(depth):
        heads = _round_width(heads, head_mul[i], min_width=1, divisor=1)
        dim = _round_width(dim, dim_mul[i], divisor=heads)
        dim_out = _round_width(dim, dim_mul[i + 1], divisor=_round_width(heads, head_mul[i + 1]))
        specs.append({
            "dim": dim, "dim_out": dim_out, "num_heads": heads, "droppath": drop[i],
            "kernel_q": kernel_q[i], "stride_q": stride_q[i],
            "kernel_kv": kernel_kv[i], "stride_kv": stride_kv[i],
        })
    return specs


def _pool(x: torch.Tensor, pool: nn.Module | None, thw: Grid, norm: nn.Module | None = None):
    """Pool the token grid of x [B, heads, 1 + T*H*W, C], leaving the class token alone."""
    if pool is None:
        return x, thw
    cls_tok, x = x[:, :, :1], x[:, :, 1:]
    B, N, _, C = x.shape
    # channels-last (the permuted view as it is): the depthwise Conv3d's backward on the CPU
    # runs about 3x faster in this layout than after .contiguous() (measured: docs/encoder.md)
    x = x.reshape(B * N, *thw, C).permute(0, 4, 1, 2, 3).contiguous(memory_format=torch.channels_last_3d)
    x = pool(x)
    thw = list(x.shape[2:])
    x = torch.cat((cls_tok, x.reshape(B, N, C, -1).transpose(2, 3)), dim=2)
    return (norm(x) if norm is not None else x), thw


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype,
                              device=x.device)).floor_()
    return x.div(keep) * mask


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: MViTConfig):
        super().__init__()
        self.patch_model = nn.Conv3d(cfg.in_channels, cfg.embed_dim, cfg.patch_kernel,
                                     cfg.patch_stride, cfg.patch_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_model(x).flatten(2).transpose(1, 2)  # B C T H W -> B THW C


class _ClsPositionalEncoding(nn.Module):
    """Prepends the class token and adds position embeddings sized from the config."""

    def __init__(self, cfg: MViTConfig):
        super().__init__()
        t, h, w = cfg.patch_grid
        dim, self.num_temporal, self.num_spatial = cfg.embed_dim, t, h * w
        self.sep_pos_embed = cfg.sep_pos_embed
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if self.sep_pos_embed:
            self.pos_embed_spatial = nn.Parameter(torch.zeros(1, self.num_spatial, dim))
            self.pos_embed_temporal = nn.Parameter(torch.zeros(1, self.num_temporal, dim))
            self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, dim))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, t * h * w + 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if not self.sep_pos_embed:
            return x + self.pos_embed
        pos = self.pos_embed_spatial.repeat(1, self.num_temporal, 1) + torch.repeat_interleave(
            self.pos_embed_temporal, self.num_spatial, dim=1
        )
        return x + torch.cat((self.pos_embed_class, pos), dim=1)


class _MultiScaleAttention(nn.Module):
    def __init__(self, cfg: MViTConfig, spec: dict[str, Any]):
        super().__init__()
        dim, self.num_heads = spec["dim"], spec["num_heads"]
        head_dim = dim // self.num_heads
        self.scale = head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=cfg.qkv_bias)
        self.k = nn.Linear(dim, dim, bias=cfg.qkv_bias)
        self.v = nn.Linear(dim, dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(cfg.dropout_rate) if cfg.dropout_rate > 0 else None

        def pool_and_norm(kernel, stride):
            # A 1x1x1 kernel at stride 1 is no pooling; pytorchvideo then creates neither
            # module, so neither may appear in the state dict.
            if not kernel or (math.prod(kernel) == 1 and math.prod(stride) == 1):
                return None, None
            conv = nn.Conv3d(head_dim, head_dim, kernel, stride=stride,
                             padding=[k // 2 for k in kernel], groups=head_dim, bias=False)
            return conv, nn.LayerNorm(head_dim, eps=cfg.pool_norm_eps)

        self.pool_q, self.norm_q = pool_and_norm(spec["kernel_q"], spec["stride_q"])
        self.pool_k, self.norm_k = pool_and_norm(spec["kernel_kv"], spec["stride_kv"])
        self.pool_v, self.norm_v = pool_and_norm(spec["kernel_kv"], spec["stride_kv"])

    def forward(self, x: torch.Tensor, thw: Grid) -> tuple[torch.Tensor, Grid]:
        B, N, C = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

        q, q_thw = _pool(heads(self.q(x)), self.pool_q, thw, self.norm_q)
        k, _ = _pool(heads(self.k(x)), self.pool_k, thw, self.norm_k)
        v, _ = _pool(heads(self.v(x)), self.pool_v, thw, self.norm_v)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        x = self.proj(x.transpose(1, 2).reshape(B, q.shape[2], C))
        if self.proj_drop is not None:
            x = self.proj_drop(x)
        return x, q_thw


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dim_out: int, dropout_rate: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim_out)
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))


class _MultiScaleBlock(nn.Module):
    def __init__(self, cfg: MViTConfig, spec: dict[str, Any]):
        super().__init__()
        dim, dim_out = spec["dim"], spec["dim_out"]
        self.droppath = spec["droppath"]
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = _MultiScaleAttention(cfg, spec)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = _Mlp(dim, int(dim * cfg.mlp_ratio), dim_out, cfg.dropout_rate)
        self.proj = nn.Linear(dim, dim_out) if dim != dim_out else None
        # The residual branch must shrink with the queries: max-pool, kernel s + 1.
        stride = spec["stride_q"]
        kernel = [s + 1 if s > 1 else s for s in stride]
        self.pool_skip = (
            nn.MaxPool3d(kernel, stride, [k // 2 for k in kernel]) if kernel else None
        )

    def forward(self, x: torch.Tensor, thw: Grid) -> tuple[torch.Tensor, Grid]:
        x_attn, thw_new = self.attn(self.norm1(x), thw)
        x_res, _ = _pool(x.unsqueeze(1), self.pool_skip, thw)
        x = x_res.squeeze(1) + _drop_path(x_attn, self.droppath, self.training)
        x_norm = self.norm2(x)
        x_mlp = self.mlp(x_norm)
        if self.proj is not None:
            x = self.proj(x_norm)  # pytorchvideo projects the normed input, not x
        return x + _drop_path(x_mlp, self.droppath, self.training), thw_new


class MViT(nn.Module):
    """MViT video encoder: ``[B, C, T, H, W]`` float clips -> ``[B, cfg.out_dim]`` features.

    The feature is the class token after ``norm_embed``, i.e. what pytorchvideo's model
    returns when ``head.proj`` is ``nn.Identity``.
    """

    def __init__(self, cfg: MViTConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or MViTConfig()
        specs = _block_specs(cfg)
        # Attribute order = pytorchvideo's, so state_dict keys come out in the same order.
        self.patch_embed = _PatchEmbed(cfg)
        self.cls_positional_encoding = _ClsPositionalEncoding(cfg)
        self.pos_drop = nn.Dropout(cfg.dropout_rate) if cfg.dropout_rate > 0 else None
        self.blocks = nn.ModuleList(_MultiScaleBlock(cfg, s) for s in specs)
        self.norm_embed = nn.LayerNorm(specs[-1]["dim_out"], eps=cfg.norm_eps)
        self.head_drop = nn.Dropout(cfg.head_dropout_rate) if cfg.head_dropout_rate > 0 else None
        self.out_dim = specs[-1]["dim_out"]
        self._init_weights()

    def _init_weights(self) -> None:
        # pytorchvideo's "vit" init; Conv3d layers keep torch's default init as there.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, _ClsPositionalEncoding):
                for p in m.parameters():
                    nn.init.trunc_normal_(p, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = self.cfg.input_shape
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"MViT expects clips of shape [B, {', '.join(map(str, expected))}] "
                f"([B, C, T, H, W], from the config), got {list(x.shape)}"
            )
        x = self.cls_positional_encoding(self.patch_embed(x))
        if self.pos_drop is not None:
            x = self.pos_drop(x)
        thw = list(self.cfg.patch_grid)
        ckpt = self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            if ckpt:
                x, thw = checkpoint(blk, x, thw, use_reentrant=False)
            else:
                x, thw = blk(x, thw)
        x = self.norm_embed(x)[:, 0]
        return self.head_drop(x) if self.head_drop is not None else x


def mvit_param_shapes(cfg: MViTConfig | None = None) -> dict[str, list[int]]:
    """State-dict names and shapes of ``MViT(cfg)``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = MViT(cfg)
    return {name: list(t.shape) for name, t in model.state_dict().items()}
