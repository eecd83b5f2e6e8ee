"""The energy network E(x): a small ResNet mapping an image to a scalar.

Low energy = looks like the training data. VAEBM multiplies the VAE's density by
``exp(-E(x))``, so E only has to learn where the VAE puts mass that data does not.
Smoothness matters more than capacity here: Langevin dynamics follows grad E, so
the network uses the Lip-swish activation and a spectral-norm regulariser (on the
convolutions; the heads' linear layers join it only when asked, otherwise weight decay
alone keeps them small).

Two heads turn the last feature map into E. "sum" (the paper's style, the default)
sum-pools it, so E is a sum of local terms; "global" (what the shipped checkpoints use)
runs an MLP on the whole map. A sum of local terms learned to tell data from the VAE's
samples by local texture and extrapolated badly to images unlike both (flat constants,
noise); the global head fixed most of that (docs/ood-analysis.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import LipSwish, ResBlock

ENERGY_HEADS = ("sum", "global")


@dataclass(frozen=True)
class EnergyConfig:
    channels: int = 1
    image_size: int = 28
    hidden: int = 32  # channels at full resolution, doubled after each downsampling
    num_downsamples: int = 2
    # How the final feature map becomes one number. "sum": sum-pool, then linear, so E is
    # a sum of local terms (the default). "global": an MLP on the whole flattened map, so
    # E can depend on how parts of the image relate (e.g. whether there is an object).
    head: str = "sum"

    def __post_init__(self) -> None:
        if self.head not in ENERGY_HEADS:
            raise ValueError(f"head must be one of {ENERGY_HEADS}, got {self.head!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EnergyConfig:
        return cls(**d)


class EnergyNet(nn.Module):
    def __init__(self, config: EnergyConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden
        self.stem = nn.Conv2d(config.channels, h, 3, padding=1)
        blocks: list[nn.Module] = []
        ch = h
        for _ in range(config.num_downsamples):
            blocks += [ResBlock(ch, 2 * ch, act=LipSwish), nn.AvgPool2d(2)]
            ch *= 2
        blocks += [ResBlock(ch, ch, act=LipSwish), LipSwish()]
        self.blocks = nn.Sequential(*blocks)
        if config.head == "sum":
            self.pool: nn.Module = SumPool()
            last = nn.Linear(ch, 1)
            self.head: nn.Module = last
        else:
            side = config.image_size // 2**config.num_downsamples
            self.pool = nn.Flatten()
            last = nn.Linear(2 * ch, 1)
            self.head = nn.Sequential(nn.Linear(ch * side * side, 2 * ch), LipSwish(), last)
        # Start from E = 0, so an untrained energy leaves the VAE's density unchanged.
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        # Power-iteration vectors for the spectral-norm regulariser, one per conv.
        for i, conv in enumerate(self.convs()):
            u = F.normalize(torch.randn(conv.weight.shape[0]), dim=0)
            self.register_buffer(f"sn_u{i}", u)

    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self.modules() if isinstance(m, nn.Conv2d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Energy of each image: x (B, C, H, W) on [-1, 1] -> (B,), lower = more data-like."""
        h = self.blocks(self.stem(x))  # (B, ch, h, w)
        return self.head(self.pool(h)).squeeze(1)

    def spectral_norm_sum(self, power_iterations: int = 1, head: bool = False) -> torch.Tensor:
        """Sum over conv layers of the largest singular value of the (out, in*k*k) weight,
        and with ``head`` over the head's linear layers too.

        The convs' values are estimated by power iteration whose vectors persist between
        calls, so one iteration per training step suffices; the head's few small matrices
        are decomposed exactly. Differentiable in the weights: adding ``alpha_s *`` this
        to the loss keeps the network smooth (the VAEBM regulariser).
        """
        total = torch.zeros((), device=self.stem.weight.device)
        for i, conv in enumerate(self.convs()):
            w = conv.weight.flatten(1)  # (out, in*k*k)
            u = getattr(self, f"sn_u{i}")
            with torch.no_grad():
                for _ in range(power_iterations):
                    v = F.normalize(w.t() @ u, dim=0)
                    u = F.normalize(w @ v, dim=0)
                getattr(self, f"sn_u{i}").copy_(u)
            total = total + u @ w @ v
        if head:
            for linear in self.head.modules():
                if isinstance(linear, nn.Linear):
                    total = total + torch.linalg.matrix_norm(linear.weight, ord=2)
        return total


class SumPool(nn.Module):
    """(B, C, H, W) -> (B, C): sum over positions (no parameters)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.sum(dim=(2, 3))
