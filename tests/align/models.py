"""Small hand-written networks that exercise one tracing rule each."""

from __future__ import annotations

import torch
from torch import nn


class FlattenNet(nn.Module):
    """conv -> BN -> ReLU on a 3x3 map, flattened into a Linear (each channel repeats 9 times)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 9, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.out(torch.relu(self.fc(h.view(h.size(0), -1))))


class CatNet(nn.Module):
    """Two conv branches concatenated along channels, a residual add, a flatten into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 5, 1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1)
        self.skip = nn.Conv2d(2, 8, 1)
        self.fc = nn.Linear(8 * 4, 6)
        self.ln = nn.LayerNorm(6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        h = torch.relu(self.mix(h) + self.skip(x))
        h = torch.flatten(h, 1)
        return self.out(torch.relu(self.ln(self.fc(h))))


class SortNet(nn.Module):
    """A hidden layer that goes through torch.sort, which permutation tracing does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        h = torch.sort(self.fc2(h), dim=-1).values
        return self.out(h)


class Branchy(nn.Module):
    """Python control flow on a tensor value: not traceable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.inner = Branchy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.fc(x))


class TinyEncoder(nn.Module):
    """Tokens -> Linear embedding + learned positions -> 2 encoder layers + LayerNorm -> mean over tokens -> head.

    With ``batch_first=False`` the input is (tokens, batch, features), as PyTorch's default layout.
    """

    def __init__(
        self, tokens: int = 5, features: int = 3, d: int = 8, classes: int = 4, batch_first: bool = True
    ) -> None:
        super().__init__()
        self.token_dim = 1 if batch_first else 0
        self.embed = nn.Linear(features, d)
        self.pos = nn.Parameter(torch.randn(tokens, d) if batch_first else torch.randn(tokens, 1, d))
        layer = nn.TransformerEncoderLayer(
            d, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=batch_first
        )
        self.encoder = nn.TransformerEncoder(
            layer, num_layers=2, norm=nn.LayerNorm(d), enable_nested_tensor=False
        )
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(x) + self.pos)
        return self.head(h.mean(dim=self.token_dim))


class CrossAttention(nn.Module):
    """Queries attend to a memory of other widths: separate q/k/v projections (kdim, vdim) and bias_k/bias_v."""

    def __init__(self, d: int = 6, kdim: int = 5, vdim: int = 7, heads: int = 3) -> None:
        super().__init__()
        self.q_in = nn.Linear(3, d)
        self.k_in = nn.Linear(4, kdim)
        self.v_in = nn.Linear(4, vdim)
        self.attn = nn.MultiheadAttention(d, heads, kdim=kdim, vdim=vdim, add_bias_kv=True, batch_first=True)
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        k, v = torch.relu(self.k_in(memory)), torch.tanh(self.v_in(memory))
        h = self.q_in(x)
        h = h + self.attn(h, k, v, need_weights=False)[0]
        return self.head(h)  # one prediction per query token


class AttentionBlock(nn.Module):
    """A residual multi-head attention block used directly, then the class token."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h[:, 0])


class BagOfEmbeddings(nn.Module):
    """Token ids -> embedding -> Linear -> ReLU -> mean over tokens -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.fc = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.emb(ids))).mean(1))


class TiedEmbeddings(nn.Module):
    """A language-model-like head whose output weight is the embedding (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 6)
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 9, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.emb(ids))))


class PackedCrossAttention(nn.Module):
    """Queries from a Linear, keys and values straight from the input: one packed in-projection reads both."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.q_in = nn.Linear(d, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.q_in(x), x, x, need_weights=False)[0])


def tiny_vit() -> nn.Module:
    """torchvision's VisionTransformer (vit_b_16's architecture) at tiny sizes: 16x16 images, 2 patches of 8."""
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    )


def tiny_convnext() -> nn.Module:
    """torchvision's ConvNeXt (convnext_tiny's architecture) with two stages of one block (8 and 16 channels)."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt(
        [CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], stochastic_depth_prob=0.0, num_classes=5
    )


class AxisShuffle(nn.Module):
    """A conv map whose channels are moved to axis 2 (neither channels-first nor last): they cannot be followed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).permute(0, 2, 1, 3).flatten(1))
