"""CIFAR models that torchvision lacks.

* ``cifar_resnet{20,32,44,56,110}``: He et al. 2016, section 4.2: a 3x3 stem with 16
  channels, three stages of 16, 32 and 64 channels with ``n = (depth - 2) / 6`` basic
  blocks each, global average pooling and a linear classifier. Down-sampling blocks use
  a 1x1 convolution with batch norm on the shortcut (option B), the form Torch-Pruning's
  and most pruning papers' ResNet-56 baselines use.
* ``cifar_vgg16_bn``: VGG-16 with batch norm and a single linear classifier (the
  network-slimming variant).
* ``cifar_mobilenet_v2``: MobileNetV2 with the stride of the stem and of the first
  down-sampling stage set to 1 for 32x32 inputs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models.mobilenetv2 import MobileNetV2

from hwprune.models._registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("CIFAR ResNet depth must be 6n + 2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers = []
        in_planes = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, w, stride))
                in_planes = w
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet(depth):
    def fn(num_classes: int = 10) -> nn.Module:
        return CifarResNet(depth, num_classes)

    fn.__name__ = f"cifar_resnet{depth}"
    return fn


for _d in (20, 32, 44, 56, 110):
    register_model(f"cifar_resnet{_d}")(_resnet(_d))


_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


class CifarVGG(nn.Module):
    def __init__(self, cfg=_VGG16, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@register_model("cifar_vgg16_bn")
def cifar_vgg16_bn(num_classes: int = 10) -> nn.Module:
    return CifarVGG(_VGG16, num_classes)


@register_model("cifar_mobilenet_v2")
def cifar_mobilenet_v2(num_classes: int = 10) -> nn.Module:
    setting = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    model = MobileNetV2(num_classes=num_classes, inverted_residual_setting=setting)
    stem = model.features[0][0]
    stem.stride = (1, 1)
    return model
