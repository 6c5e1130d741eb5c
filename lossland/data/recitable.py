"""The committed texts a language model may recite (`lossland/data/texts/`; see its README).

`recitable_texts()` gives {name: RecitableText} for
`lossland.curvature.memorization.scan`: each text's name is its file name
without `.txt`, its kind 'sequence' for the generated `sequence-*` lists and
'verbatim' for everything else (licences, public-domain prose and verse).
"""
from __future__ import annotations

import pathlib
from typing import NamedTuple

TEXTS_DIR = pathlib.Path(__file__).resolve().parent / 'texts'
KINDS = ('verbatim', 'sequence')


class RecitableText(NamedTuple):
  text: str
  kind: str  # 'verbatim' or 'sequence'


def kind_of(name: str) -> str:
  """'sequence' for a generated list (`sequence-*`), 'verbatim' for stored text."""
  return 'sequence' if name.startswith('sequence-') else 'verbatim'


def recitable_texts(directory: str | pathlib.Path | None = None) -> dict[str, RecitableText]:
  """{name: RecitableText} of every `*.txt` in `directory` (default: the committed texts).

  A user's own folder works the same way: name generated lists `sequence-*.txt`.
  """
  folder = pathlib.Path(directory) if directory else TEXTS_DIR
  files = sorted(folder.glob('*.txt'))
  if not files:
    raise FileNotFoundError(f'{folder} has no .txt files to scan for memorized passages')
  return {f.stem: RecitableText(f.read_text(encoding='utf-8'), kind_of(f.stem)) for f in files}
