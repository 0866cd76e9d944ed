"""The realistic zoo's architectures: the shapes real third-party models have.

Each is small enough to train in a minute or two on two CPU cores, and each carries the operators
its family is known for, written the way the family's public code writes them:

- :class:`CRNN`: text-line recognizer (convs with batch norm, a bidirectional LSTM, per-column
  class scores for CTC), any line width.
- :class:`DBNet`: segmentation-style text detector (strided backbone, FPN with nearest ``Resize``
  upsampling, a head of 2x2 stride-2 ``ConvTranspose`` up to a sigmoid probability map), any size
  that is a multiple of 8.
- :class:`MobileNetV3`: classifier with hard-swish, squeeze-excite (a per-channel ``Mul``) and
  depthwise convs.
- :class:`PNet`: the first net of an MTCNN-style face cascade: PReLU everywhere and two heads (a
  face/background softmax and box offsets), fully convolutional.
- :class:`PitchNet`: 1-D conv audio model on raw waveform frames (batch norm, max pooling,
  sigmoid pitch bins), as CREPE-style estimators are built.
- :class:`TinyTransformer`: encoder over a sequence of feature vectors (LayerNorm, GELU,
  attention written as ``MatMul`` of activations and ``Softmax``), any sequence length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(c_in: int, c_out: int, k=3, stride=1, padding=None, groups: int = 1, act: nn.Module | None = None):
    padding = (k // 2 if isinstance(k, int) else tuple(v // 2 for v in k)) if padding is None else padding
    layers = [nn.Conv2d(c_in, c_out, k, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    layers.append(act if act is not None else nn.ReLU())
    return nn.Sequential(*layers)


class CRNN(nn.Module):
    """Text-line recognizer: ``(N, 1, 32, W)`` -> ``(N, W / 4, classes + 1)`` log-probabilities
    (class 0 is CTC's blank)."""

    def __init__(self, num_classes: int = 10, hidden: int = 48) -> None:
        super().__init__()
        self.input_shape = (1, 32, None)
        self.features = nn.Sequential(
            _conv_bn(1, 24), nn.MaxPool2d(2),            # 16 x W/2
            _conv_bn(24, 48), nn.MaxPool2d(2),           # 8 x W/4
            _conv_bn(48, 64), nn.MaxPool2d((2, 1)),      # 4 x W/4
            _conv_bn(64, 64, (4, 1), padding=0),         # 1 x W/4
        )
        self.rnn = nn.LSTM(64, hidden, bidirectional=True, batch_first=True)
        self.classifier = nn.Linear(2 * hidden, num_classes + 1)

    def forward(self, x):
        f = self.features(x).squeeze(2).permute(0, 2, 1)  # (N, T, C)
        seq, _ = self.rnn(f)
        return F.log_softmax(self.classifier(seq), dim=-1)


class DBNet(nn.Module):
    """Text detector: ``(N, 1, H, W)`` -> ``(N, 1, H, W)`` text probability, H and W multiples of 8."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.input_shape = (1, None, None)
        w = width
        self.stage1 = nn.Sequential(_conv_bn(1, w, stride=2), _conv_bn(w, w))              # /2
        self.stage2 = nn.Sequential(_conv_bn(w, 2 * w, stride=2), _conv_bn(2 * w, 2 * w))  # /4
        self.stage3 = nn.Sequential(_conv_bn(2 * w, 4 * w, stride=2), _conv_bn(4 * w, 4 * w))  # /8
        self.lat1, self.lat2, self.lat3 = (nn.Conv2d(c, w, 1) for c in (w, 2 * w, 4 * w))
        self.smooth = _conv_bn(3 * w, w)
        self.up1 = nn.ConvTranspose2d(w, w, 2, stride=2)
        self.up_bn = nn.BatchNorm2d(w)
        self.head = nn.Conv2d(w, 1, 3, padding=1)

    def forward(self, x):
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        c3 = self.stage3(c2)
        p3 = self.lat3(c3)
        p2 = self.lat2(c2) + F.interpolate(p3, scale_factor=2.0, mode="nearest")
        p1 = self.lat1(c1) + F.interpolate(p2, scale_factor=2.0, mode="nearest")
        fused = torch.cat([p1, F.interpolate(p2, scale_factor=2.0, mode="nearest"),
                           F.interpolate(p3, scale_factor=4.0, mode="nearest")], dim=1)
        y = torch.relu(self.up_bn(self.up1(self.smooth(fused))))
        return torch.sigmoid(self.head(y))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))


class Bneck(nn.Module):
    """MobileNetV3's block: expand 1x1, depthwise kxk, optional squeeze-excite, project 1x1."""

    def __init__(self, c_in: int, expand: int, c_out: int, k: int, stride: int, se: bool, hswish: bool) -> None:
        super().__init__()
        act = nn.Hardswish if hswish else nn.ReLU
        self.expand = _conv_bn(c_in, expand, 1, act=act())
        self.dw = _conv_bn(expand, expand, k, stride, groups=expand, act=act())
        self.se = SqueezeExcite(expand, max(8, expand // 4)) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(expand, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV3(nn.Module):
    """MobileNetV3-Small-style classifier for ``(N, 3, 32, 32)`` images."""

    def __init__(self, num_classes: int = 6) -> None:
        super().__init__()
        self.input_shape = (3, 32, 32)
        self.stem = _conv_bn(3, 16, 3, 2, act=nn.Hardswish())  # 16x16
        self.blocks = nn.Sequential(
            Bneck(16, 16, 16, 3, 2, True, False),    # 8x8
            Bneck(16, 48, 24, 3, 1, False, False),
            Bneck(24, 64, 24, 3, 1, False, False),
            Bneck(24, 72, 32, 5, 2, True, True),     # 4x4
            Bneck(32, 96, 32, 5, 1, True, True),
        )
        self.last = _conv_bn(32, 96, 1, act=nn.Hardswish())
        self.fc1 = nn.Linear(96, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.last(self.blocks(self.stem(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(F.hardswish(self.fc1(x)))


class PNet(nn.Module):
    """MTCNN-style proposal net: ``(N, 3, H, W)`` -> face probability ``(N, 2, h, w)`` and box
    offsets ``(N, 4, h, w)``; on a 12x12 patch h = w = 1."""

    def __init__(self) -> None:
        super().__init__()
        self.input_shape = (3, 12, 12)
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.cls = nn.Conv2d(32, 2, 1)
        self.box = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return torch.softmax(self.cls(x), dim=1), self.box(x)


class PitchNet(nn.Module):
    """CREPE-style pitch estimator: ``(N, 1, 1024)`` waveform frames -> ``(N, bins)`` sigmoid
    salience per pitch bin."""

    def __init__(self, bins: int = 36, width: int = 16) -> None:
        super().__init__()
        self.input_shape = (1, 1024)
        w = width
        chans = [1, 4 * w, w, w, 2 * w, 2 * w]
        kernels = [64, 15, 15, 15, 15]
        strides = [4, 1, 1, 1, 1]
        pads = [30, 7, 7, 7, 7]  # 1024 -> 256 -> (pool) 128 -> 64 -> 32 -> 16 -> 8
        layers = []
        for i in range(5):
            layers += [nn.Conv1d(chans[i], chans[i + 1], kernels[i], strides[i], pads[i]),
                       nn.BatchNorm1d(chans[i + 1]), nn.ReLU(), nn.MaxPool1d(2)]
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(2 * w * 8, bins)

    def forward(self, x):
        return torch.sigmoid(self.classifier(self.flatten(self.features(x))))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        h = self.heads

        def split(y):
            return y.reshape(n, t, h, d // h).transpose(1, 2)  # (N, h, T, d/h)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d // h), dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).reshape(n, t, d)
        return self.out(y)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ff1, self.ff2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ff2(F.gelu(self.ff1(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Pre-norm encoder: ``(N, T, features)`` -> ``(N, classes)``, T up to ``max_len``."""

    def __init__(self, features: int = 28, num_classes: int = 10, dim: int = 64, depth: int = 2,
                 heads: int = 4, max_len: int = 64) -> None:
        super().__init__()
        self.input_shape = (None, features)
        self.embed = nn.Linear(features, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_len, dim))
        self.layers = nn.Sequential(*(EncoderLayer(dim, heads, 2 * dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x) + self.pos[:, : x.shape[1]]
        x = self.norm(self.layers(x))
        return self.head(x.mean(dim=1))
