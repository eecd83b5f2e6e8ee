"""VAEBM: the frozen VAE, the energy network, and Langevin dynamics in noise space.

The joint ``h(x, z) ∝ exp(-E(x)) p_vae(x|z) p(z)`` becomes, after the VAE's
reparameterisation ``x = T(eps)``, ``h(eps) ∝ exp(-E(T(eps))) N(eps; 0, I)``. Langevin
dynamics on ``U(eps) = E(T(eps)) + 0.5 ||eps||^2`` starts from the prior N(0, I),
where the VAE alone would sample, and moves toward regions the energy prefers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from model.energy import EnergyNet
from model.vae import VAE


@dataclass
class NoiseState:
    """The point Langevin dynamics moves: eps_z per latent group and eps_x per pixel."""

    eps_z: list[torch.Tensor]
    eps_x: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [*self.eps_z, self.eps_x]


class VAEBM(nn.Module):
    def __init__(self, vae: VAE, energy: EnergyNet) -> None:
        super().__init__()
        self.vae = vae
        self.energy = energy

    @property
    def device(self) -> torch.device:
        return self.energy.stem.weight.device

    def prior_noise(
        self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> NoiseState:
        """Starting points eps ~ N(0, temperature^2 I); temperature 1 is the prior."""
        eps_z = [temperature * t for t in self.vae.prior_noise(n, generator)]
        eps_x = torch.randn(n, *self.vae.image_shape, device=self.device, generator=generator)
        return NoiseState(eps_z, temperature * eps_x)

    def decode(self, noise: NoiseState) -> tuple[torch.Tensor, torch.Tensor]:
        """T(eps): returns (the image sample mu + sigma * eps_x, the decoder mean mu)."""
        mean, log_scale = self.vae.decode_noise(noise.eps_z)
        return mean + torch.exp(log_scale) * noise.eps_x, mean

    def noise_energy(self, noise: NoiseState) -> torch.Tensor:
        """U(eps) = E(T(eps)) + 0.5 ||eps||^2 per chain, (B,)."""
        x, _ = self.decode(noise)
        prior = sum(0.5 * t.pow(2).flatten(1).sum(1) for t in noise.tensors())
        return self.energy(x) + prior

    def langevin(
        self,
        noise: NoiseState,
        *,
        steps: int,
        step_size: float,
        generator: torch.Generator | None = None,
    ) -> NoiseState:
        """Run ``steps`` Langevin updates ``eps <- eps - (eta/2) grad U + sqrt(eta) N(0, I)``.

        Gradients flow only to eps (the networks' parameters are untouched); the
        result is detached.
        """
        if steps < 0 or not 0 <= step_size < math.inf:  # NaN fails too
            raise ValueError(
                f"steps must be >= 0 and step_size finite and >= 0, got {steps}, {step_size}"
            )
        eps = [t.detach().clone() for t in noise.tensors()]
        with torch.enable_grad():
            for _ in range(steps):
                for t in eps:
                    t.requires_grad_(True)
                state = NoiseState(eps[:-1], eps[-1])
                grads = torch.autograd.grad(self.noise_energy(state).sum(), eps)
                eps = [
                    (
                        t - 0.5 * step_size * g + math.sqrt(step_size) * _randn_like(t, generator)
                    ).detach()
                    for t, g in zip(eps, grads, strict=True)
                ]
        return NoiseState(eps[:-1], eps[-1])

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        steps: int = 16,
        step_size: float = 1e-4,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Draw n images: Langevin from the prior, then the decoder **mean** (eps_x dropped).

        Returns (n, C, H, W) on [-1, 1]. ``steps=0`` gives the VAE's own samples
        from the same noise, for comparison. The same seed gives the same images.
        """
        noise, generator = self.start_chains(n, seed)
        noise = self.langevin(noise, steps=steps, step_size=step_size, generator=generator)
        return self.chain_images(noise)

    def start_chains(
        self, n: int, seed: int | None = None
    ) -> tuple[NoiseState, torch.Generator | None]:
        """The first half of :meth:`sample`: n chains at the prior and their generator.

        Running ``langevin`` on them with this generator, in one call or in several of
        fewer steps, then :meth:`chain_images`, gives exactly :meth:`sample`'s images: a
        caller can stop between steps, or let other work run there.
        """
        generator = _generator(self.device, seed)
        return self.prior_noise(n, generator), generator

    @torch.no_grad()
    def chain_images(self, noise: NoiseState) -> torch.Tensor:
        """The last half of :meth:`sample`: the decoder mean of the chains, on [-1, 1]."""
        _, mean = self.decode(noise)
        return mean.clamp(-1, 1)


class PersistentBuffer:
    """A replay buffer of eps_z chains, as in VAEBM's optional persistent training.

    Each draw takes a stored chain with probability ``reuse_prob`` and a fresh N(0, I)
    one otherwise; eps_x is always fresh. After Langevin, ``update`` writes the
    chains back to the slots they came from.
    """

    def __init__(self, vae: VAE, size: int, generator: torch.Generator | None = None) -> None:
        self.eps_z = vae.prior_noise(size, generator)
        self.size = size

    def draw(
        self,
        n: int,
        reuse_prob: float,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """n chains and the slots they came from; fresh ones ~ N(0, temperature^2 I)."""
        device = self.eps_z[0].device
        idx = torch.randint(self.size, (n,), device=device, generator=generator)
        reuse = torch.rand(n, device=device, generator=generator) < reuse_prob
        eps_z = []
        for stored in self.eps_z:
            fresh = temperature * torch.randn(
                n, *stored.shape[1:], device=device, generator=generator
            )
            mask = reuse.view(n, *([1] * (stored.dim() - 1)))
            eps_z.append(torch.where(mask, stored[idx], fresh))
        return eps_z, idx

    def update(self, idx: torch.Tensor, eps_z: list[torch.Tensor]) -> None:
        for stored, new in zip(self.eps_z, eps_z, strict=True):
            stored[idx] = new.detach()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"eps_z{i}": t for i, t in enumerate(self.eps_z)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.eps_z = [state[f"eps_z{i}"].to(self.eps_z[i].device) for i in range(len(self.eps_z))]


def _generator(device: torch.device, seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def _randn_like(t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(t.shape, device=t.device, dtype=t.dtype, generator=generator)
