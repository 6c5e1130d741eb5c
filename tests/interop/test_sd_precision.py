"""The SD UNet and VAE in float32 stay within 1e-5 of their float64 selves (two-pass GroupNorm).

flax's default GroupNorm variance E[x²] − E[x]² cancels badly on activations
with a large mean: with it (`use_fast_variance=True` in lossland/models/sd_*.py)
this test measures 2.0e-5 and 3.1e-5 (relative to the output scale) on the two
tiny UNets at t = 981, with the two-pass variance 1.8e-6 and 2.0e-6 (the
failure message prints the value). The reference is the same lossland model
run in float64.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland.interop import diffusers_unet, diffusers_vae

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / 'fixtures' / 'sd'


def _relative_to_float64(module, variables, *args):
  y32 = np.asarray(jax.jit(module.apply)(variables, *args))
  with jax.enable_x64(True):
    module64 = module.clone(dtype=jnp.float64)
    as64 = lambda a: jnp.asarray(a, jnp.float64) if np.issubdtype(np.asarray(a).dtype,
                                                                   np.floating) else jnp.asarray(a)
    y64 = np.asarray(jax.jit(module64.apply)(jax.tree.map(as64, variables),
                                             *(as64(a) for a in args)))
  return float(np.abs(y32 - y64).max() / np.abs(y64).max())


@pytest.mark.parametrize('folder', ['tiny_sd1', 'tiny_sd2'])
def test_the_unet_near_t_1000_is_within_1e_5_of_float64(folder):
  unet, variables = diffusers_unet.load_unet(FIXTURES / folder / 'unet')
  ref = np.load(FIXTURES / folder / 'reference.npz')
  x = np.asarray(ref['unet_x']).transpose(0, 2, 3, 1)
  t = np.full((x.shape[0],), 981)
  error = _relative_to_float64(unet, variables, x, t, ref['unet_context'])
  assert error < 1e-5, error


@pytest.mark.parametrize('folder', ['tiny_sd1', 'tiny_sd2'])
def test_the_vae_decoder_is_within_1e_5_of_float64(folder):
  vae, variables = diffusers_vae.load_vae(FIXTURES / folder / 'vae')
  z = jax.random.normal(jax.random.key(0), (1, 8, 8, vae.config.latent_channels)) * 3.0
  error = _relative_to_float64(_Decoder(vae), variables, z)
  assert error < 1e-5, error


class _Decoder:
  """`vae.decode` as a module-like object with `apply` and `clone(dtype=...)`."""

  def __init__(self, vae):
    self.vae = vae

  def apply(self, variables, z):
    return self.vae.apply(variables, z, method='decode')

  def clone(self, **kwargs):
    return _Decoder(self.vae.clone(**kwargs))
