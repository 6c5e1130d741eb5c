"""Package hygiene: importing one method does not import every dependency."""
import subprocess
import sys

import pytest


def _modules_after(statement: str) -> set[str]:
  code = f'import sys; {statement}; print(" ".join(sorted(sys.modules)))'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  return set(out.stdout.split())


@pytest.mark.parametrize('method', ['curvature', 'lowrank'])
def test_importing_a_method_skips_datasets_and_checkpoints(method):
  loaded = _modules_after(f'import lossland.{method}')
  assert f'lossland.{method}' in loaded
  for heavy in ('tensorflow_datasets', 'orbax', 'PIL', 'lossland.train', 'lossland.data'):
    assert heavy not in loaded, f'import lossland.{method} imported {heavy}'


def test_top_level_shortcuts_resolve_lazily():
  import lossland
  assert lossland.fit is lossland.train.fit
  assert lossland.TransformerLM is lossland.models.TransformerLM
  with pytest.raises(AttributeError, match='no attribute'):
    lossland.not_a_name  # noqa: B018


def test_importing_the_launchers_leaves_the_environment_alone():
  code = ('import os; os.environ.pop("XLA_FLAGS", None); import launch.train, launch.analyze, '
          'launch.bench; print(os.environ.get("XLA_FLAGS"))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == 'None'
