"""CLIP tokenizer folders as people have them, against transformers' CLIPTokenizer ids.

References: tests/fixtures/sd/tokenizer_reference.npz and the tokenizer.json-only
folder tests/fixtures/sd/tokenizer_json/, written by
scripts/make_sd_tokenizer_fixtures.py (transformers 5.24.0): ids of prompts with
"!" (SD 2.x's pad token, split out as a special token) and spelled-out special
tokens, for the fixture folders, the SD 1.x / 2.x release configs (AddedToken
dicts), a config with `added_tokens_decoder`, and transformers 5's
`save_pretrained` output (tokenizer.json + tokenizer_config.json).
"""
import json
import pathlib
import shutil

import numpy as np
import pytest

from lossland.interop import clip_tokenizer, diffusers

SD = pathlib.Path(__file__).resolve().parent.parent / 'fixtures' / 'sd'
REF = np.load(SD / 'tokenizer_reference.npz')
CASES = [str(c) for c in REF['case_names']]


def _folder(case, tmp_path):
  i = CASES.index(case)
  folder = tmp_path / 'tokenizer'
  shutil.copytree(SD / str(REF['case_sources'][i]), folder)
  for name, content in json.loads(str(REF['case_files'][i])).items():
    (folder / name).write_text(json.dumps(content))
  return folder


@pytest.mark.parametrize('case', CASES)
def test_ids_match_transformers(case, tmp_path):
  tok = clip_tokenizer.load_clip_tokenizer(_folder(case, tmp_path))
  ids = tok.encode([str(p) for p in REF['prompts']])
  want = REF[f'{case}/ids']
  bad = [(str(p), list(g[g != tok.pad_id]), list(w[w != tok.pad_id]))
         for p, g, w in zip(REF['prompts'], ids, want) if not np.array_equal(g, w)]
  assert not bad, bad
  assert [tok.start_id, tok.end_id, tok.pad_id] == list(REF[f'{case}/special_ids'])


def test_sd2_splits_exclamation_marks_out_as_its_pad_token():
  tok = clip_tokenizer.load_clip_tokenizer(SD / 'tiny_sd2' / 'tokenizer')
  assert tok.tokens('a dog!!')[1:-1] == ['a</w>', 'dog</w>', '!', '!']
  assert tok.encode(['a dog!'])[0, 3] == tok.pad_id == tok.vocab['!']
  sd1 = clip_tokenizer.load_clip_tokenizer(SD / 'tiny_sd1' / 'tokenizer')
  assert sd1.tokens('a dog!')[1:-1] == ['a</w>', 'dog</w>', '!</w>']  # "!" is no SD 1.x special
  assert tok.word_positions('a cat! and a dog!', 'dog') == [(6,)]


def test_tokenizer_json_only_folder_loads():
  folder = SD / 'tokenizer_json'
  assert sorted(p.name for p in folder.iterdir()) == ['tokenizer.json', 'tokenizer_config.json']
  tok = clip_tokenizer.load_clip_tokenizer(folder)
  assert tok.tokens('a <CAT-TOY>!')[1:-1] == ['a</w>', '<cat-toy>', '!']
  want = clip_tokenizer.load_clip_tokenizer(SD / 'tiny_sd2' / 'tokenizer')
  prompts = ['a cat and a dog', 'A photo of a Tiger, with a bowl.', 'an elephant!']
  np.testing.assert_array_equal(tok.encode(prompts), want.encode(prompts))


def test_a_folder_without_bpe_files_names_both_layouts(tmp_path):
  (tmp_path / 'tokenizer_config.json').write_text('{}')
  with pytest.raises(FileNotFoundError, match=r"(?s)has no tokenizer.json and lacks "
                     r"\['vocab.json', 'merges.txt'\].*tokenizer_config.json.*"
                     r"vocab.json \+ merges.txt.*save_pretrained writes tokenizer.json \+ "
                     r"tokenizer_config.json"):
    clip_tokenizer.load_clip_tokenizer(tmp_path)


def test_check_folder_accepts_a_tokenizer_json_only_tokenizer(tmp_path):
  for sub in diffusers.COMPONENTS:
    if sub != 'tokenizer':
      shutil.copytree(SD / 'tiny_sd2' / sub, tmp_path / sub)
  shutil.copytree(SD / 'tokenizer_json', tmp_path / 'tokenizer')
  diffusers.check_folder(tmp_path)
  (tmp_path / 'tokenizer' / 'tokenizer.json').unlink()
  with pytest.raises(ValueError, match=r"lacks \['tokenizer/tokenizer.json or vocab.json \+ "
                                       r"merges.txt'\]"):
    diffusers.check_folder(tmp_path)
