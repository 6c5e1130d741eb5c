"""lossland's SD VAE against diffusers' AutoencoderKL on the tiny random SD folders.

References (tests/fixtures/sd/*/reference.npz, scripts/make_sd_fixtures.py), torch
NCHW float32: `vae_decoded` = AutoencoderKL.decode(vae_z).sample and `vae_mean`,
`vae_logvar` = encode(vae_x).latent_dist. Both VAEs have block_out_channels
(16, 32), 8 norm groups and one downsampling (64 x 64 images, 32 x 32
latents); tiny_sd2's weights are stored in float16.
"""
import json
import pathlib
import shutil

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from lossland.interop import diffusers_vae

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / 'fixtures' / 'sd'


@pytest.fixture(scope='module', params=['tiny_sd1', 'tiny_sd2'])
def loaded(request):
  folder = FIXTURES / request.param
  vae, variables = diffusers_vae.load_vae(folder / 'vae')
  return vae, variables, dict(np.load(folder / 'reference.npz'))


def _nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def _close(got, want):
  # A float32 VAE of unit-scale random weights, ~15 conv/norm layers each way: float32
  # rounding (and a different conv summation order) leaves ~1e-6 of the output scale
  # (measured at most 1.0e-6 of max|want| over decode, mean and logvar of both folders);
  # 2e-5 of the scale leaves room for other CPUs' conv algorithms and still catches any
  # wrong weight, norm epsilon or padding, which move the outputs by 1e-3 or more.
  want = _nhwc(want)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5 * np.abs(want).max(), rtol=0)


def test_decode_matches_diffusers(loaded):
  vae, variables, ref = loaded
  image = vae.apply(variables, _nhwc(ref['vae_z']), method=vae.decode)
  _close(image, ref['vae_decoded'])


def test_encode_matches_diffusers_latent_distribution(loaded):
  vae, variables, ref = loaded
  mean, logvar = vae.apply(variables, _nhwc(ref['vae_x']), method=vae.encode)
  _close(mean, ref['vae_mean'])
  _close(logvar, ref['vae_logvar'])


def _copy_vae(tmp_path, edit=None):
  folder = tmp_path / 'vae'
  shutil.copytree(FIXTURES / 'tiny_sd1' / 'vae', folder)
  if edit:
    config = json.loads((folder / 'config.json').read_text())
    config.update(edit)
    (folder / 'config.json').write_text(json.dumps(config))
  return folder


def test_unsupported_config_fields_are_named_together(tmp_path):
  folder = _copy_vae(tmp_path, {'up_block_types': ['UpDecoderBlock2D', 'AttnUpDecoderBlock2D'],
                                'shift_factor': 0.1159})
  with pytest.raises(ValueError, match=r"the VAE \(vae/config.json\) config has fields lossland "
                                       r"does not implement: \[\"up_block_types=\[.*"
                                       r"AttnUpDecoderBlock2D.*shift_factor=0.1159"):
    diffusers_vae.load_vae(folder)
  folder = _copy_vae(tmp_path / 'other', {'_class_name': 'AutoencoderTiny'})
  with pytest.raises(ValueError, match=r"_class_name='AutoencoderTiny'"):
    diffusers_vae.load_vae(folder)


def test_a_checkpoint_missing_a_tensor_names_it(tmp_path):
  folder = _copy_vae(tmp_path)
  weights = folder / 'diffusion_pytorch_model.safetensors'
  state = safetensors.numpy.load_file(str(weights))
  del state['decoder.up_blocks.0.upsamplers.0.conv.weight']
  safetensors.numpy.save_file(state, str(weights))
  with pytest.raises(ValueError, match=r'the VAE checkpoint does not match its config: 1 params '
                                       r'have no tensor: \[.*decoder/up_blocks_0/upsamplers_0/'
                                       r'conv/kernel \(as decoder.up_blocks.0.upsamplers.0.conv.'
                                       r'weight\)'):
    diffusers_vae.load_vae(folder)


def test_a_config_without_quant_convs_leaves_their_tensors_unused(tmp_path):
  folder = _copy_vae(tmp_path, {'use_quant_conv': False, 'use_post_quant_conv': False})
  with pytest.raises(ValueError, match=r"4 tensors are not used: \['post_quant_conv.bias', "
                                       r"'post_quant_conv.weight', 'quant_conv.bias', "
                                       r"'quant_conv.weight'\]"):
    diffusers_vae.load_vae(folder)


def test_bfloat16_weights_load_as_their_float32_values(tmp_path):
  folder = _copy_vae(tmp_path)
  weights = folder / 'diffusion_pytorch_model.safetensors'
  state = safetensors.numpy.load_file(str(weights))
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}
  safetensors.numpy.save_file(bf16, str(weights))
  _, got = diffusers_vae.load_vae(folder)
  _, want = diffusers_vae.load_vae(FIXTURES / 'tiny_sd1' / 'vae')
  got, want = got['params'], want['params']
  kernel = np.asarray(got['decoder']['conv_out']['kernel'])
  assert kernel.dtype == np.float32
  rounded = np.asarray(want['decoder']['conv_out']['kernel']).astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(kernel, rounded.astype(np.float32))
  assert not np.array_equal(kernel, np.asarray(want['decoder']['conv_out']['kernel']))
