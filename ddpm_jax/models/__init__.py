"""Networks: the DDPM UNet and its sinusoidal timestep embedding."""

from ddpm_jax.models.unet import UNet, timestep_embedding, unet_from_config

__all__ = ["UNet", "timestep_embedding", "unet_from_config"]
