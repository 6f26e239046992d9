"""The PyTorch side of ``benchmarks/kd_speed.py``: the same models and the same KD step.

Written for the comparison only, never imported by kdjax or its tests. The step is the loop the
KD literature's PyTorch codebases run (RepDistiller's ``train_distill``): the teacher in
``eval()`` under ``no_grad``, ``kl_div(log_softmax(s/T), softmax(t/T), "batchmean") * T**2``
mixed with the cross-entropy, then SGD with momentum. Models are laid out as kdjax's are
(:mod:`kdjax.models.mlp`, :mod:`kdjax.models.cifar_resnet`), so both sides do the same FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class MLP(nn.Module):
    def __init__(self, inputs: int, hidden: Sequence[int], classes: int):
        super().__init__()
        widths = [inputs, *hidden]
        pairs = zip(widths, widths[1:], strict=False)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in pairs)
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.head(x)


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, features: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, features, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(features)
        self.conv2 = nn.Conv2d(features, features, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(features)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != features:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, features, 1, stride, bias=False), nn.BatchNorm2d(features)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, widths: Sequence[int], classes: int):
        super().__init__()
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers, inputs = [], widths[0]
        for width, stride in zip(widths[1:], (1, 2, 2), strict=True):
            for block in range(blocks):
                layers.append(BasicBlock(inputs, width, stride if block == 0 else 1))
                inputs = width
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(inputs, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3)))


_X4 = (32, 64, 128, 256)
_PLAIN = (16, 16, 32, 64)


def build(name: str, classes: int) -> nn.Module:
    """The torch twin of a kdjax model config used by a workload."""
    if name == "mlp1200":
        return MLP(784, (1200, 1200), classes)
    if name == "mlp800":
        return MLP(784, (800, 800), classes)
    depth = int(name.removeprefix("resnet").removesuffix("x4"))
    return CifarResNet(depth, _X4 if name.endswith("x4") else _PLAIN, classes)


def make_step(teachers, student, temperature: float, alpha: float, lr: float = 0.05):
    """One KD update, returning the loss. An ensemble's soft targets are its members' averaged
    tempered probabilities, as in :mod:`kdjax.distillers.kd`."""
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9)
    for teacher in teachers:
        teacher.eval()
    student.train()

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            targets = sum(F.softmax(t(images) / temperature, -1) for t in teachers)
            targets = targets / len(teachers)
        logits = student(images)
        log_probs = F.log_softmax(logits / temperature, -1)
        soft = F.kl_div(log_probs, targets, reduction="batchmean") * temperature**2
        loss = (1 - alpha) * F.cross_entropy(logits, labels) + alpha * soft
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step
