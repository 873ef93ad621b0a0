"""A ResNet-18-layout CNN (no torchvision) and zero-argument factories of the pruning test models.

``resnet18_layout`` follows torchvision's ResNet-18 exactly in layout: a 7x7 stride-2 stem conv,
BatchNorm, ReLU and 3x3 stride-2 max-pool, four stages of two basic blocks with ``width * (1, 2,
4, 8)`` channels (stride 2 and a 1x1 conv + BN shortcut when the shape changes), global average
pooling and a Linear classifier. ``width=64`` is torchvision's; pared benchmarks use ``width=32``.

The zero-argument factories (``tiny_resnet``, ``tiny_bert_encoder``, ``tiny_mha_model``, ...) can
be named as an artefact source ``{"kind": "factory", "spec": "pared.testing.resnet:tiny_resnet"}``
so ``load_artefact`` rebuilds them in a fresh process. Every one is seeded, so two calls return
identical weights.
"""

from __future__ import annotations

import torch
from torch import nn

from pared.errors import UsageError


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with an identity or 1x1 conv + BN shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)  # the add couples conv2, the shortcut and the input


class ResNet(nn.Module):
    """ResNet with basic blocks; see ``resnet18_layout``."""

    def __init__(self, width: int, num_classes: int, blocks: tuple[int, ...] = (2, 2, 2, 2)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        c_in = width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            stage = [BasicBlock(c_in if j == 0 else c_out, c_out, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*stage))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, num_classes) logits."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_layout(width: int = 32, num_classes: int = 1000, *, seed: int = 0) -> ResNet:
    """A seeded ResNet-18-layout CNN in eval mode, with non-trivial BatchNorm statistics.

    Args:
        width: channels of the stem and first stage (stages use 1x, 2x, 4x, 8x); 64 is ResNet-18.
        num_classes: outputs of the classifier.
        seed: initialisation seed (weights are random: this model measures speed and structure).

    Example:
        >>> resnet18_layout(32)(torch.zeros(1, 3, 224, 224)).shape
        torch.Size([1, 1000])
    """
    if width < 1 or num_classes < 1:
        raise UsageError(f"resnet18_layout needs width >= 1 and num_classes >= 1, got {width}, {num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNet(width, num_classes)
        _randomize_batchnorm(model)
    return model.eval()


def _randomize_batchnorm(model: nn.Module) -> None:
    # Fresh BN (mean 0, var 1, gamma 1) would make every channel look alike to importance
    # criteria that read BN; random statistics make tests and benchmarks less degenerate.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)


# ------------------------------------------------------------------------ zero-argument factories


def tiny_resnet() -> ResNet:
    """``resnet18_layout(width=8, num_classes=10)``: about 180k parameters, for 32x32 inputs."""
    return resnet18_layout(8, 10, seed=0)


class MLP(nn.Module):
    """``Linear -> ReLU -> Linear -> ReLU -> Linear`` (16 -> 32 -> 32 -> 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def tiny_mlp3() -> MLP:
    """A seeded three-layer ``MLP`` in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MLP().eval()


class ConvBNNet(nn.Module):
    """Conv-BN-ReLU x2, max-pool, then flatten into a two-layer classifier, for (B, 3, 8, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.fc1, self.fc2 = nn.Linear(16 * 4 * 4, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))  # flatten: channel c -> 16 features


def tiny_conv_bn() -> ConvBNNet:
    """A seeded ``ConvBNNet`` with random BatchNorm statistics, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ConvBNNet()
        _randomize_batchnorm(model)
    return model.eval()


def tiny_bert_encoder() -> nn.Module:
    """A 2-layer, 4-head, hidden-32 BERT (vocab 100) inside ``SentenceEncoder``; needs transformers."""
    from transformers import BertConfig, BertModel

    from pared.tasks.minilm import SentenceEncoder

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bert = BertModel(config, add_pooling_layer=False)
    return SentenceEncoder(bert).eval()


class MHABlock(nn.Module):
    """Self-attention (``nn.MultiheadAttention``, 4 heads, dim 32, batch first) + residual + FFN."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.ffn = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, 32) -> (B, T, 32)."""
        a, _ = self.attn(x, x, x, need_weights=False)
        x = self.norm(x + a)
        return x + self.ffn(x)


def tiny_mha_model() -> MHABlock:
    """A seeded ``MHABlock`` in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MHABlock().eval()
