"""VAEs saved with the mid-block attention's pre-0.14 names load as diffusers loads them.

Older diffusers VAE checkpoints name the mid-block attention projections
`query`, `key`, `value`, `proj_attn`; diffusers renames them on load to `to_q`,
`to_k`, `to_v`, `to_out.0` (`ModelMixin._fix_state_dict_keys_on_load`). The test
renames tiny_sd1's VAE tensors back to the old names: the params must be the
ones of the original file, whose outputs test_sd_vae.py checks against
diffusers. (Loading that renamed file in diffusers 0.42.1 decodes `vae_z` to
exactly the reference `vae_decoded`, max difference 0.0.)
"""
import pathlib
import re
import shutil

import jax
import numpy as np
import safetensors.numpy

from lossland.interop import diffusers_vae

VAE = pathlib.Path(__file__).resolve().parent.parent / 'fixtures' / 'sd' / 'tiny_sd1' / 'vae'
_NEW = re.compile(r'^((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)'
                  r'\.(weight|bias)$')
_OLD = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}


def test_old_mid_block_attention_names_load(tmp_path):
  state = safetensors.numpy.load_file(VAE / 'diffusion_pytorch_model.safetensors')
  old = {}
  for key, value in state.items():
    m = _NEW.match(key)
    old[f'{m.group(1)}.{_OLD[m.group(2)]}.{m.group(3)}' if m else key] = value
  assert sum(k.endswith('proj_attn.weight') for k in old) == 2  # encoder and decoder
  shutil.copy(VAE / 'config.json', tmp_path / 'config.json')
  safetensors.numpy.save_file(old, tmp_path / 'diffusion_pytorch_model.safetensors')
  _, got = diffusers_vae.load_vae(tmp_path)
  _, want = diffusers_vae.load_vae(VAE)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_rename_keeps_other_names():
  state = {'decoder.mid_block.attentions.0.query.weight': 1, 'decoder.conv_in.weight': 2,
           'decoder.up_blocks.0.attentions.0.query.weight': 3}  # not a deprecated block
  assert diffusers_vae.rename_deprecated_attention(state) == {
      'decoder.mid_block.attentions.0.to_q.weight': 1, 'decoder.conv_in.weight': 2,
      'decoder.up_blocks.0.attentions.0.query.weight': 3}
