"""ResNets for the examples and benchmarks: torchvision's where it imports, else a compact fallback.

torchvision from PyPI is a CUDA build; next to the CPU-only torch wheel it fails to
import. GPU machines (most users) get ``torchvision.models.resnet18/50``; elsewhere,
as in FFCV's own CIFAR example, a compact ResNet defined here stands in, with the same
block layout (BasicBlock [2, 2, 2, 2] for 18, Bottleneck [3, 4, 6, 3] for 50).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["resnet", "CompactResNet", "BlurPoolConv2d", "apply_blurpool"]


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.short = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.short(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


_LAYOUTS = {"resnet18": (_Basic, (2, 2, 2, 2)), "resnet50": (_Bottleneck, (3, 4, 6, 3))}


class CompactResNet(nn.Module):
    """ResNet-18/50 layout; ``small_input=True`` uses a 3x3 stem without max-pool (32x32 images)."""

    def __init__(self, arch: str = "resnet18", num_classes: int = 10, small_input: bool = True) -> None:
        super().__init__()
        block, counts = _LAYOUTS[arch]
        # torchvision's names (conv1, bn1): the ImageNet recipe exempts parameters named "bn" from weight decay
        if small_input:
            self.stem = nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 64, 3, 1, 1, bias=False),
                                                  bn1=nn.BatchNorm2d(64), relu=nn.ReLU()))
        else:
            self.stem = nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 64, 7, 2, 3, bias=False), bn1=nn.BatchNorm2d(64),
                                                  relu=nn.ReLU(), maxpool=nn.MaxPool2d(3, 2, 1)))
        layers, cin = [], 64
        for i, n in enumerate(counts):
            width = 64 * 2**i
            for j in range(n):
                layers.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class BlurPoolConv2d(nn.Module):
    """A fixed 3x3 binomial low-pass filter, per channel, before a strided convolution (Zhang 2019).

    FFCV's ImageNet recipe (``use_blurpool: 1`` in every config) puts it before every
    convolution with stride > 1 and at least 16 input channels; the filter
    ``[1, 2, 1] x [1, 2, 1] / 16`` is a buffer, not a parameter.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = (taps[:, None] * taps[None, :]) / 16.0
        self.register_buffer("blur_filter", kernel.expand(conv.in_channels, 1, 3, 3).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = F.conv2d(x, self.blur_filter.to(x.dtype), padding=1, groups=self.conv.in_channels)
        return self.conv(blurred)


def apply_blurpool(model: nn.Module) -> int:
    """Wrap every ``Conv2d`` with stride > 1 and >= 16 input channels in ``BlurPoolConv2d`` (in place); count them."""
    count = 0
    for name, child in model.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(model, name, BlurPoolConv2d(child))
            count += 1
        else:
            count += apply_blurpool(child)
    return count


def resnet(arch: str = "resnet18", num_classes: int = 10, small_input: bool = False) -> tuple[nn.Module, str]:
    """``(model, description)``: torchvision's ``arch`` where it imports, else ``CompactResNet``.

    ``small_input`` adapts the stem to 32x32 images (3x3 conv, no max-pool) in both.
    """
    if arch not in _LAYOUTS:
        raise ValueError(f"arch must be one of {sorted(_LAYOUTS)}, got {arch!r}")
    try:
        import torchvision.models as tvm

        model = getattr(tvm, arch)(num_classes=num_classes)
        if small_input:
            model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        return model, f"torchvision.models.{arch}"
    except Exception as exc:  # noqa: BLE001 - missing, or a CUDA build next to CPU torch
        why = f"torchvision: {type(exc).__name__}"
        return CompactResNet(arch, num_classes, small_input), f"CompactResNet({arch}) ({why})"
