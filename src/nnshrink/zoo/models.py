"""Reference models: LeNet-300-100, the Caffe LeNet-5, a small ResNet and a MobileNetV2-style net.

Every model takes ``(N, C, H, W)`` images in [0, 1] and returns class logits; ``input_shape``
records the ``(C, H, W)`` it was built for.
"""

from __future__ import annotations

import math

from torch import nn

from nnshrink.errors import ConfigError


class LeNet300(nn.Module):
    """LeNet-300-100: 784-300-100-10 fully connected (266,610 parameters on 28x28)."""

    def __init__(self, input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(math.prod(input_shape), 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x):
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(self.flatten(x))))))


class LeNet5(nn.Module):
    """LeNet-5 as in Caffe's MNIST example: conv 20@5x5, pool, conv 50@5x5, pool, fc 500, fc 10.

    Like the Caffe model (and the pruning papers that use it) there is no nonlinearity after the
    convolutions; a ReLU follows the 500-wide layer. 431,080 parameters and 2,293,000 MACs on 28x28.
    """

    def __init__(self, input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> None:
        super().__init__()
        c, h, w = input_shape
        if min(h, w) < 16:
            raise ConfigError(f"lenet5 needs images of at least 16x16, got {h}x{w}")
        self.input_shape = tuple(input_shape)
        self.conv1 = nn.Conv2d(c, 20, 5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(50 * fh * fw, 500)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm and a residual add (1x1 conv shortcut when shapes change)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet8(nn.Module):
    """ResNet-8: a 3x3 stem and three basic blocks (16, 32, 64 channels), global pool, fc."""

    def __init__(self, input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10,
                 widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.layer1 = BasicBlock(widths[0], widths[0], 1)
        self.layer2 = BasicBlock(widths[0], widths[1], 2)
        self.layer3 = BasicBlock(widths[1], widths[2], 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear project; residual if shapes allow."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        out = self.block(x)
        return x + out if self.residual else out


class MobileNet(nn.Module):
    """A MobileNetV2-style net sized for 28x28 digits.

    Stem 3x3 conv (16), inverted residual stages (expansion, channels, repeats, stride):
    (1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 1), a 1x1 conv to 128, global
    average pooling and a linear classifier.
    """

    SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 1))

    def __init__(self, input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        c = 16
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], c, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(c), nn.ReLU6())
        blocks = []
        for expand, c_out, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                blocks.append(InvertedResidual(c, c_out, stride if i == 0 else 1, expand))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(c, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.dropout(self.flatten(self.pool(x))))


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "lenet300": LeNet300,
    "lenet5": LeNet5,
    "resnet8": ResNet8,
    "mobilenet": MobileNet,
}


def build(name: str, input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """An untrained zoo model by name.

    Raises:
        ConfigError: Unknown name or an input shape the model cannot take.
    """
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown zoo model {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name](tuple(input_shape), num_classes)
