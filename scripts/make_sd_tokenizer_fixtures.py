"""transformers' CLIPTokenizer ids of prompts with special tokens in them, for lossland's tokenizer.

SD 2.x pads with "!", which its tokenizer holds as a special token: transformers
splits every "!" of a prompt out as that token (id of "!", not "!</w>") before
BPE. Which tokens are split out, and whether they are matched on the raw or
the normalized (lowercased) text, depends on how the tokenizer folder was
saved; this script covers the layouts of the folders people have:

  tiny_sd1, tiny_sd2     the folders of make_sd_fixtures.py (vocab.json, merges.txt,
                         tokenizer_config.json with plain string tokens)
  sd1_hub, sd2_hub       their vocab and merges with the tokenizer_config.json and
                         special_tokens_map.json of the SD 1.x / 2.x releases
                         (AddedToken dicts with normalized=true; pad "<|endoftext|>"
                         / "!" as strings)
  sd2_decoder            tokenizer_config.json with `added_tokens_decoder`, as
                         transformers 4.34+ wrote it
  tokenizer_json         tests/fixtures/sd/tokenizer_json/: what transformers 5's
                         `save_pretrained` writes (tokenizer.json and
                         tokenizer_config.json only, no vocab.json or merges.txt), of
                         tiny_sd2's tokenizer with a textual-inversion token "<cat-toy>"

Writes tests/fixtures/sd/tokenizer_reference.npz:

  prompts [n] str
  case_names [c] str; case_sources [c] str (the tokenizer folder, relative to
    tests/fixtures/sd); case_files [c] str (JSON {file name: contents} written over
    a copy of that folder; "{}" for none)
  <case>/ids [n, 77] int64: tokenizer(prompts, padding='max_length', max_length=77)
  <case>/special_ids [3] int64: bos, eos and pad ids

Environment (torch, transformers and diffusers are not lossland dependencies):

  /tmp/hfvenv/bin/pip install torch==2.13.0 transformers==5.24.0 tokenizers==0.23.3 numpy==2.4.6

Run from the repository root:  /tmp/hfvenv/bin/python scripts/make_sd_tokenizer_fixtures.py
"""
from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

import numpy as np
import transformers
from transformers import CLIPTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent / 'tests' / 'fixtures' / 'sd'
PROMPTS = ('a cat!', 'a cat! and a dog!!', 'wow!!! a dog', '!a', '?!', 'A CAT!?',
           'a red ball on a blue bench!', 'a <|endoftext|> b', 'a <|ENDOFTEXT|> b',
           'x<|startoftext|>y', 'a  cat\t!\n!', "it's a dog's bowl!", 'élan! 42!',
           'a <cat-toy> on a bench!', '<CAT-TOY>!', '')


def _legacy(content: str) -> dict:
  """An AddedToken as transformers 4.x wrote it into tokenizer_config.json."""
  return {'__type': 'AddedToken', 'content': content, 'lstrip': False, 'normalized': True,
          'rstrip': False, 'single_word': False}


def _map_entry(content: str) -> dict:
  """An AddedToken as transformers 4.x wrote it into special_tokens_map.json."""
  return {'content': content, 'lstrip': False, 'normalized': True, 'rstrip': False,
          'single_word': False}


def _hub_files(pad: str) -> dict:
  config = {'add_prefix_space': False, 'bos_token': _legacy('<|startoftext|>'),
            'do_lower_case': True, 'eos_token': _legacy('<|endoftext|>'), 'errors': 'replace',
            'model_max_length': 77, 'name_or_path': 'openai/clip-vit-large-patch14',
            'pad_token': pad, 'special_tokens_map_file': './special_tokens_map.json',
            'tokenizer_class': 'CLIPTokenizer', 'unk_token': _legacy('<|endoftext|>')}
  special = {'bos_token': _map_entry('<|startoftext|>'), 'eos_token': _map_entry('<|endoftext|>'),
             'pad_token': pad, 'unk_token': _map_entry('<|endoftext|>')}
  return {'tokenizer_config.json': config, 'special_tokens_map.json': special}


def _decoder_files() -> dict:
  entry = lambda c, n: {'content': c, 'lstrip': False, 'normalized': n, 'rstrip': False,
                        'single_word': False, 'special': True}
  return {'tokenizer_config.json': {
      'add_prefix_space': False,
      'added_tokens_decoder': {'0': entry('!', False), '587': entry('<|startoftext|>', True),
                               '588': entry('<|endoftext|>', True)},
      'bos_token': '<|startoftext|>', 'clean_up_tokenization_spaces': True,
      'do_lower_case': True, 'eos_token': '<|endoftext|>', 'errors': 'replace',
      'model_max_length': 77, 'pad_token': '!', 'tokenizer_class': 'CLIPTokenizer',
      'unk_token': '<|endoftext|>'}}


def write_tokenizer_json_folder() -> None:
  """tests/fixtures/sd/tokenizer_json: transformers 5's save_pretrained (module docstring)."""
  folder = ROOT / 'tokenizer_json'
  shutil.rmtree(folder, ignore_errors=True)
  tok = CLIPTokenizer.from_pretrained(str(ROOT / 'tiny_sd2' / 'tokenizer'))
  tok.add_tokens(['<cat-toy>'])
  tok.save_pretrained(str(folder))
  have = sorted(p.name for p in folder.iterdir())
  assert have == ['tokenizer.json', 'tokenizer_config.json'], have
  config = json.loads((folder / 'tokenizer_config.json').read_text())
  for key in ('is_local', 'local_files_only'):  # where it was loaded from, not the tokenizer
    config.pop(key, None)
  (folder / 'tokenizer_config.json').write_text(json.dumps(config, indent=2) + '\n')


CASES = {  # name -> (tokenizer folder relative to ROOT, files written over a copy of it)
    'tiny_sd1': ('tiny_sd1/tokenizer', {}),
    'tiny_sd2': ('tiny_sd2/tokenizer', {}),
    'sd1_hub': ('tiny_sd1/tokenizer', _hub_files('<|endoftext|>')),
    'sd2_hub': ('tiny_sd2/tokenizer', _hub_files('!')),
    'sd2_decoder': ('tiny_sd2/tokenizer', _decoder_files()),
    'tokenizer_json': ('tokenizer_json', {}),
}


def main() -> None:
  print('transformers', transformers.__version__)
  write_tokenizer_json_folder()
  ref = {'prompts': np.array(PROMPTS), 'case_names': np.array(list(CASES)),
         'case_sources': np.array([s for s, _ in CASES.values()]),
         'case_files': np.array([json.dumps(f) for _, f in CASES.values()])}
  for name, (source, files) in CASES.items():
    with tempfile.TemporaryDirectory() as tmp:
      folder = pathlib.Path(tmp) / 'tokenizer'
      shutil.copytree(ROOT / source, folder)
      for file, content in files.items():
        (folder / file).write_text(json.dumps(content))
      tok = CLIPTokenizer.from_pretrained(str(folder))
      ids = np.array(tok(list(PROMPTS), padding='max_length', max_length=77)['input_ids'])
    assert ids.shape == (len(PROMPTS), 77), ids.shape
    ref[f'{name}/ids'] = ids
    ref[f'{name}/special_ids'] = np.array([tok.bos_token_id, tok.eos_token_id, tok.pad_token_id])
    split = {p: tok.convert_ids_to_tokens(tok(p, add_special_tokens=False)['input_ids'])
             for p in ('a cat! and a dog!!', 'a <|ENDOFTEXT|> b', '<CAT-TOY>!')}
    print(f'{name}: pad {tok.pad_token!r} = {tok.pad_token_id}; {split}')
  np.savez_compressed(ROOT / 'tokenizer_reference.npz', **ref)
  print(f'{ROOT / "tokenizer_reference.npz"}: {len(CASES)} cases x {len(PROMPTS)} prompts')


if __name__ == '__main__':
  main()
