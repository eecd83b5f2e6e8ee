"""A hierarchical convolutional VAE with a per-pixel discretised Gaussian decoder.

Latent groups are arranged top-down as in NVAE: the coarsest group z_1 (at 1/4 of
the image side) has a standard normal prior; each further group z_i (at 1/2 of the
side) has a Gaussian prior conditioned on the groups above it. Every latent is a
reparameterised draw ``z_i = mean_i + scale_i * eps_i``, and the image is
``x = mu(z) + sigma(z) * eps_x``: exactly the map T(eps) that VAEBM's Langevin
sampler needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from model.layers import ResBlock, decoder_log_scale, gaussian_kl, gaussian_log_prob, soft_clamp
from model.likelihood import discretized_gaussian_log_prob

SUPPORTED_SIZES = (28, 32, 64)
SUPPORTED_CHANNELS = (1, 3)


@dataclass(frozen=True)
class VAEConfig:
    channels: int = 1  # 1 (grayscale) or 3 (RGB)
    image_size: int = 28  # square side: 28, 32 or 64
    hidden: int = 32  # feature channels at full resolution; doubled at 1/4
    # Channels of each latent group, top (1/4 side) first; a second group sits at
    # 1/2 side. One entry gives a flat (single-group) VAE.
    latent_channels: tuple[int, ...] = field(default=(8, 4))

    def __post_init__(self) -> None:
        if self.channels not in SUPPORTED_CHANNELS:
            raise ValueError(f"channels must be one of {SUPPORTED_CHANNELS}, got {self.channels}")
        if self.image_size not in SUPPORTED_SIZES:
            raise ValueError(f"image_size must be one of {SUPPORTED_SIZES}, got {self.image_size}")
        if not 1 <= len(self.latent_channels) <= 2:
            raise ValueError(f"latent_channels must have 1 or 2 groups, got {self.latent_channels}")

    @property
    def num_dims(self) -> int:
        """D, the number of pixel values per image (for bits per dimension)."""
        return self.channels * self.image_size**2

    def to_dict(self) -> dict:
        return {**asdict(self), "latent_channels": list(self.latent_channels)}

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        return cls(**{**d, "latent_channels": tuple(d["latent_channels"])})


# A group sampler receives (group index, prior mean, prior log-scale, decoder
# features at that level, None for the top group) and returns the group's z; a
# posterior sampler records log q(z|x), log p(z) and the KL on the side.
GroupSampler = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class VAE(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        c, h = config.channels, config.hidden
        zc = config.latent_channels
        # Bottom-up (encoder) path: full -> 1/2 -> 1/4 resolution.
        self.enc_in = nn.Conv2d(c, h, 3, padding=1)
        self.enc_half = nn.Sequential(ResBlock(h, h), nn.Conv2d(h, h, 4, stride=2, padding=1))
        self.enc_quarter = nn.Sequential(
            ResBlock(h, h), nn.Conv2d(h, 2 * h, 4, stride=2, padding=1), ResBlock(2 * h, 2 * h)
        )
        self.posterior_top = nn.Conv2d(2 * h, 2 * zc[0], 3, padding=1)
        # Top-down (decoder) path.
        self.dec_top = nn.Sequential(nn.Conv2d(zc[0], 2 * h, 3, padding=1), ResBlock(2 * h, 2 * h))
        self.dec_up = nn.Sequential(nn.ConvTranspose2d(2 * h, h, 4, stride=2, padding=1))
        self.hierarchical = len(zc) == 2
        if self.hierarchical:
            self.prior_mid = nn.Sequential(nn.SiLU(), nn.Conv2d(h, 2 * zc[1], 3, padding=1))
            self.posterior_mid = nn.Sequential(
                ResBlock(2 * h, h), nn.SiLU(), nn.Conv2d(h, 2 * zc[1], 3, padding=1)
            )
            self.dec_mid = nn.Conv2d(zc[1], h, 3, padding=1)
        self.dec_out = nn.Sequential(
            ResBlock(h, h),
            nn.ConvTranspose2d(h, h, 4, stride=2, padding=1),
            ResBlock(h, h),
            nn.SiLU(),
            nn.Conv2d(h, 2 * c, 3, padding=1),
        )

    # ----------------------------------------------------------------- shapes
    @property
    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """Shape (C, H, W) of each latent group, top first."""
        s = self.config.image_size
        sides = (s // 4, s // 2)
        return [(ch, sides[i], sides[i]) for i, ch in enumerate(self.config.latent_channels)]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        s = self.config.image_size
        return (self.config.channels, s, s)

    # ------------------------------------------------------------- top-down
    def _top_down(
        self, sample_group: GroupSampler, batch: int
    ) -> tuple[list, torch.Tensor, torch.Tensor]:
        """Run the decoder, drawing each latent group with ``sample_group``.

        Returns the latents and the decoder's per-pixel mean and log-scale.
        """
        zs_shape = self.latent_shapes[0]
        device = self.enc_in.weight.device
        zero = torch.zeros(batch, *zs_shape, device=device)
        z_top = sample_group(0, zero, zero, None)
        feat = self.dec_up(self.dec_top(z_top))  # (B, h, S/2, S/2)
        zs = [z_top]
        if self.hierarchical:
            prior_mean, prior_log_scale = self.prior_mid(feat).chunk(2, dim=1)
            z_mid = sample_group(1, prior_mean, soft_clamp(prior_log_scale), feat)
            feat = feat + self.dec_mid(z_mid)
            zs.append(z_mid)
        mean, raw_log_scale = self.dec_out(feat).chunk(2, dim=1)  # (B, C, S, S) each
        return zs, mean, decoder_log_scale(raw_log_scale)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h_half = self.enc_half(self.enc_in(x))  # (B, h, S/2, S/2)
        h_quarter = self.enc_quarter(h_half)  # (B, 2h, S/4, S/4)
        return h_half, h_quarter

    def _posterior_pass(
        self, x: torch.Tensor, noise: list[torch.Tensor] | None = None, k: int = 1
    ) -> dict[str, torch.Tensor]:
        """k draws z ~ q(z|x) per image. Returns log p(x|z), log p(z), log q(z|x) and the
        KL, each (k * B,) in nats, draw j of image b at row ``j * B + b``.

        The encoder is deterministic, so it runs once per image and its features are
        repeated k times: only the decoder pays for the k draws. ``noise`` optionally
        fixes the standard-normal draw of each group (same shapes as the posterior
        means), so that a caller can make scores reproducible per image.
        """
        h_half, h_quarter = self._encode(x)
        if k > 1:
            x = x.repeat(k, 1, 1, 1)
            h_half, h_quarter = h_half.repeat(k, 1, 1, 1), h_quarter.repeat(k, 1, 1, 1)
        terms = {name: x.new_zeros(x.shape[0]) for name in ("log_pz", "log_qz", "kl")}

        def from_posterior(
            i: int,
            prior_mean: torch.Tensor,
            prior_log_scale: torch.Tensor,
            feat: torch.Tensor | None,
        ) -> torch.Tensor:
            if i == 0:
                q = self.posterior_top(h_quarter)
            else:
                assert feat is not None  # only the top group has no features above it
                q = self.posterior_mid(torch.cat([h_half, feat], dim=1))
            q_mean, q_log_scale = q.chunk(2, dim=1)
            q_log_scale = soft_clamp(q_log_scale)
            eps = noise[i] if noise is not None else torch.randn_like(q_mean)
            z = q_mean + torch.exp(q_log_scale) * eps
            terms["log_qz"] += gaussian_log_prob(z, q_mean, q_log_scale).flatten(1).sum(1)
            terms["log_pz"] += gaussian_log_prob(z, prior_mean, prior_log_scale).flatten(1).sum(1)
            kl = gaussian_kl(q_mean, q_log_scale, prior_mean, prior_log_scale)
            terms["kl"] += kl.flatten(1).sum(1)
            return z

        _, mean, log_scale = self._top_down(from_posterior, x.shape[0])
        log_px = discretized_gaussian_log_prob(x, mean, log_scale).flatten(1).sum(1)
        return {"log_px_z": log_px, **terms}

    # ---------------------------------------------------------- likelihoods
    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """Evidence lower bound log p(x) >= E_q[log p(x|z)] - KL, in nats per image.

        Parameters
        ----------
        x : Tensor (B, C, H, W) on [-1, 1], 8-bit levels.

        Returns
        -------
        Tensor (B,): single-sample ELBO, nats (higher = more likely). The KL of each
        group is analytic given the groups above it.
        """
        terms = self._posterior_pass(x)
        return terms["log_px_z"] - terms["kl"]

    def elbo_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reconstruction term and the KL separately (nats, (B,)), for training."""
        terms = self._posterior_pass(x)
        return {"log_px_z": terms["log_px_z"], "kl": terms["kl"]}

    forward = elbo_terms  # what DistributedDataParallel calls during training

    def iwae(self, x: torch.Tensor, k: int = 16) -> torch.Tensor:
        """Importance-weighted bound with ``k`` samples, in nats per image (B,).

        ``log (1/k) sum_i p(x, z_i) / q(z_i | x)``: a lower bound of log p(x) that is
        on average at least the ELBO and tightens as k grows.
        """
        return self.iwae_and_elbo(x, k)[0]

    def iwae_and_elbo(
        self, x: torch.Tensor, k: int, noise: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k-sample IWAE bound and the ELBO averaged over the same k draws (nats, (B,)).

        ``noise``: optional standard-normal draws per latent group, each
        (k * B, C, H, W) with sample j of image b at row ``j * B + b``.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        batch = x.shape[0]
        t = self._posterior_pass(x, noise, k)
        log_w = (t["log_px_z"] + t["log_pz"] - t["log_qz"]).view(k, batch)
        elbo = (t["log_px_z"] - t["kl"]).view(k, batch).mean(0)
        return torch.logsumexp(log_w, dim=0) - math.log(k), elbo

    # ------------------------------------------------ the reparameterised map
    def prior_noise(self, n: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """eps_z ~ N(0, I): one tensor (n, C, H, W) per latent group."""
        device = self.enc_in.weight.device
        return [torch.randn(n, *s, device=device, generator=generator) for s in self.latent_shapes]

    def decode_noise(self, eps_z: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """T_z: map eps_z through the prior to z, then decode.

        Returns the decoder mean mu(z) and log-scale, each (B, C, H, W); the image
        is ``x = mu + exp(log_scale) * eps_x``.
        """

        def from_prior(
            i: int,
            prior_mean: torch.Tensor,
            prior_log_scale: torch.Tensor,
            feat: torch.Tensor | None,
        ) -> torch.Tensor:
            return prior_mean + torch.exp(prior_log_scale) * eps_z[i]

        _, mean, log_scale = self._top_down(from_prior, eps_z[0].shape[0])
        return mean, log_scale

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral draws from the VAE alone; returns decoder means (n, C, H, W) on [-1, 1]."""
        mean, _ = self.decode_noise(self.prior_noise(n, generator))
        return mean.clamp(-1, 1)
