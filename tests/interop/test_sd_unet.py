"""lossland's SD UNet against diffusers' UNet2DConditionModel on the tiny random SD folders.

References (tests/fixtures/sd/*/reference.npz, scripts/make_sd_fixtures.py):
`unet_eps` = UNet(unet_x, unet_t, unet_context) and `unet_probs16`, the
head-averaged cross-attention probabilities of its 16x16 layers, in float32.
tiny_sd1 is SD 1.x-shaped (conv proj_in/out, 2 heads everywhere); tiny_sd2 is
SD 2.x-shaped (linear projections, heads (4, 8, 8), float16 weights).
"""
import json
import re
import pathlib
import shutil

import jax
import numpy as np
import pytest

from lossland import taps
from lossland.interop import diffusers_unet

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / 'fixtures' / 'sd'


@pytest.fixture(scope='module', params=['tiny_sd1', 'tiny_sd2'])
def loaded(request):
  folder = FIXTURES / request.param
  unet, variables = diffusers_unet.load_unet(folder / 'unet')
  return unet, variables, dict(np.load(folder / 'reference.npz'))


def _nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def test_unet_output_and_cross_attention_match_diffusers(loaded):
  unet, variables, ref = loaded
  run = jax.jit(lambda v, x, t, c: taps.capture(unet.apply, v, x, t, c, select='.*attn2.*',
                                                types=(taps.AttentionWeights,)))
  eps, captured = run(variables, _nhwc(ref['unet_x']), ref['unet_t'], ref['unet_context'])
  want = _nhwc(ref['unet_eps'])
  # A float32 UNet of unit-scale random weights, ~40 layers deep: ~1e-5 of the output scale
  # (measured 7e-6 on tiny_sd1, 3e-5 on tiny_sd2).
  np.testing.assert_allclose(np.asarray(eps), want, atol=1e-4 * np.abs(want).max(), rtol=0)
  at16 = {k: v[0] for k, v in captured.outputs.items() if v[0].shape[2] == 256}
  names = [re.sub(r'\.(\d+)', r'_\1', str(n)).replace('.processor', '/probs').replace('.', '/')
           for n in ref['unet_probs16_names']]
  assert list(at16) == names
  got = np.stack([np.asarray(p).mean(1) for p in at16.values()])
  np.testing.assert_allclose(got, ref['unet_probs16'], atol=1e-6)  # measured 2e-7


def test_latents_of_any_size_upsample_to_their_skips(loaded):
  unet, variables, ref = loaded
  x = np.zeros((1, 30, 22, 4), np.float32)  # 30 -> 15 -> 8 and back, as diffusers' upsample_size
  out = jax.eval_shape(unet.apply, variables, x, np.array([10]), ref['unet_context'][:1])
  assert out.shape == (1, 30, 22, 4)


def _copy_unet(tmp_path, edit=None):
  folder = tmp_path / 'unet'
  shutil.copytree(FIXTURES / 'tiny_sd1' / 'unet', folder)
  if edit:
    config = json.loads((folder / 'config.json').read_text())
    config.update(edit)
    (folder / 'config.json').write_text(json.dumps(config))
  return folder


def test_unsupported_config_fields_are_named_together(tmp_path):
  folder = _copy_unet(tmp_path, {'class_embed_type': 'timestep', 'resnet_time_scale_shift':
                                 'scale_shift', 'down_block_types': ['SimpleCrossAttnDownBlock2D',
                                                                     'CrossAttnDownBlock2D',
                                                                     'DownBlock2D']})
  with pytest.raises(ValueError, match=r"unet/config.json\) config has fields lossland does not "
                                       r"implement: \[\"down_block_types=\['Simple.*"
                                       r"class_embed_type='timestep'.*"
                                       r"resnet_time_scale_shift='scale_shift'"):
    diffusers_unet.load_unet(folder)


def test_a_checkpoint_that_does_not_match_its_config_names_the_tensors(tmp_path):
  folder = _copy_unet(tmp_path, {'layers_per_block': 2})
  with pytest.raises(ValueError, match=r'the UNet checkpoint does not match its config: \d+ '
                                       r'params have no tensor: \[.*down_blocks_0/attentions_1/.*'
                                       r'tensors have another shape'):
    diffusers_unet.load_unet(folder)
  (folder / 'diffusion_pytorch_model.safetensors').unlink()
  with pytest.raises(FileNotFoundError, match='neither diffusion_pytorch_model.safetensors nor'):
    diffusers_unet.load_unet(folder)
