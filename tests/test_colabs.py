"""Every notebook in colabs/ runs top to bottom, so none rots."""
import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'colabs', '*.ipynb')))
# The default run keeps the quickstart; the others, 20-70 s each on 2 cores, run with
# `pytest -m slow`. Their library paths stay in the default run: the curvature pipeline in
# tests/curvature/test_curvature_selection.py and test_hf_edit.py, the others in their
# experiments' runlocal tests.
DEFAULT_RUN = ('quickstart.ipynb',)


@pytest.mark.parametrize('path', [
    pytest.param(p, id=os.path.basename(p),
                 marks=() if os.path.basename(p) in DEFAULT_RUN else pytest.mark.slow)
    for p in NOTEBOOKS])
def test_notebook_runs(path, data_dir):
  del data_dir  # sets LOSSLAND_DATA_DIR for the kernel, so embedded datasets are built once
  notebook = nbformat.read(path, as_version=4)
  os.environ.setdefault('MPLBACKEND', 'Agg')
  NotebookClient(notebook, timeout=300, kernel_name='python3',
                 resources={'metadata': {'path': os.path.join(ROOT, 'colabs')}}).execute()
