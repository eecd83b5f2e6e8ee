"""Small building blocks shared by the VAE and the energy network."""

from __future__ import annotations

import math

import torch
from torch import nn


def soft_clamp(x: torch.Tensor, bound: float = 5.0) -> torch.Tensor:
    """Smoothly limit ``x`` to (-bound, bound); keeps log-scales from blowing up."""
    return bound * torch.tanh(x / bound)


def decoder_log_scale(raw: torch.Tensor) -> torch.Tensor:
    """Log of the per-pixel decoder scale, ``sigma = exp(soft_clamp(raw)) + 0.01``.

    The 0.01 floor is the one VAEBM uses: it keeps the Gaussian wide enough for
    Langevin moves in eps_x to matter and the likelihood finite.
    """
    return torch.log(torch.exp(soft_clamp(raw)) + 0.01)


class LipSwish(nn.Module):
    """``x * sigmoid(x) / 1.1``: a smooth activation with Lipschitz constant below 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x) / 1.1


class ResBlock(nn.Module):
    """conv-act-conv with a residual connection (1x1 skip when channels change)."""

    def __init__(self, in_ch: int, out_ch: int, act: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        self.act1, self.act2 = act(), act()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act1(x))
        h = self.conv2(self.act2(h))
        return self.skip(x) + h


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(z; mean, exp(log_scale)^2) in nats."""
    return (
        -0.5 * ((z - mean) * torch.exp(-log_scale)) ** 2 - log_scale - 0.5 * math.log(2 * math.pi)
    )


def gaussian_kl(
    mean_q: torch.Tensor, log_scale_q: torch.Tensor, mean_p: torch.Tensor, log_scale_p: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(mean_q, s_q^2) || N(mean_p, s_p^2)) in nats."""
    var_ratio = torch.exp(2 * (log_scale_q - log_scale_p))
    mean_term = ((mean_q - mean_p) * torch.exp(-log_scale_p)) ** 2
    return 0.5 * (var_ratio + mean_term - 1) - (log_scale_q - log_scale_p)
