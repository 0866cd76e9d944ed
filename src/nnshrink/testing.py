"""Tiny models for tests and examples: each exercises one structural case."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ConcatNet(nn.Module):
    """Two branches concatenated on channels, global average pooling, a classifier."""

    input_shape = (3, 16, 16)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.left = nn.Conv2d(8, 6, 1)
        self.right = nn.Conv2d(8, 10, 3, padding=1)
        self.merge = nn.Conv2d(16, 12, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.cat([self.left(x), torch.relu(self.right(x))], dim=1)
        return self.fc(torch.flatten(self.pool(self.merge(x)), 1))


class GroupedNet(nn.Module):
    """A grouped conv (groups=2) and a depthwise conv, on 1-D and 2-D signals."""

    input_shape = (4, 12, 12)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 12 * 12, 3)

    def forward(self, x):
        x = self.pointwise(torch.relu(self.depthwise(self.grouped(torch.relu(self.conv(x))))))
        return self.fc(x.reshape(x.shape[0], -1))


class Conv1dNet(nn.Module):
    """Conv1d layers over a sequence, for 1-D analysis."""

    input_shape = (2, 32)

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 6, 5, stride=2)
        self.c2 = nn.Conv1d(6, 6, 3, groups=6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.c1(x))).mean(dim=2))


class SharedLayerNet(nn.Module):
    """One linear layer called twice, one never called, and an LSTM: analysis edge cases."""

    input_shape = (8,)

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)
        self.rnn = nn.LSTM(8, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.shared(torch.relu(self.shared(x)))
        out, _ = self.rnn(x[:, None, :])
        return self.head(out[:, -1])


class UntraceableNet(nn.Module):
    """Control flow on tensor values: torch.fx cannot trace it."""

    input_shape = (4,)

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class DynamicConvNet(nn.Module):
    """Fully convolutional with global pooling: runs on any image size."""

    input_shape = (1, 20, 20)

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn1(self.c1(x)))
        y = torch.relu(self.bn2(self.c2(y)) + y)
        return self.fc(y.mean(dim=(2, 3)))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial statistics and affine terms (in place), for fold tests."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model


class FusedAttentionNet(nn.Module):
    """timm's ViT attention on ``(N, T, 48)``: one fused q/k/v Linear reshaped to ``(N, T, 3,
    heads, d)``, permuted and unbound; ``sdpa``: through ``scaled_dot_product_attention``;
    ``leak``: the fused output is also used whole."""

    def __init__(self, dim=48, heads=4, sdpa=False, leak=False):
        super().__init__()
        self.num_heads, self.head_dim, self.sdpa, self.leak = heads, dim // heads, sdpa, leak
        self.norm, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.drop, self.fc = nn.Dropout(0.0), nn.Linear(dim, 5)

    def forward(self, x):
        x = self.norm(x)
        b, n, c = x.shape
        fused = self.qkv(x)
        q, k, v = fused.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = self.drop((q * self.head_dim ** -0.5 @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
        y = self.proj(y.transpose(1, 2).reshape(b, n, c)) + x
        return self.fc(y + fused[..., :c] if self.leak else y)  # leak: the fused output also used whole


class SplitAttentionNet(nn.Module):
    """nanoGPT's causal attention on ``(N, 16, 48)``: one fused Linear split along its channels
    into q, k and v."""

    def __init__(self, dim=48, heads=4, steps=16):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.norm, self.c_attn, self.c_proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("causal", torch.tril(torch.ones(steps, steps)).view(1, 1, steps, steps))
        self.fc = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.norm(x)
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(self.dim, dim=2)
        q = q.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        k = k.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = torch.softmax(att.masked_fill(self.causal == 0, float("-inf")), dim=-1)
        return self.fc(self.c_proj((att @ v).transpose(1, 2).contiguous().view(b, t, c)) + x)
