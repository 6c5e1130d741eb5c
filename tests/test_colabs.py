"""Every notebook in colabs/ runs top to bottom, so none rots."""
import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'colabs', '*.ipynb')))


@pytest.mark.parametrize('path', NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs(path, data_dir):
  del data_dir  # sets LOSSLAND_DATA_DIR for the kernel, so embedded datasets are built once
  notebook = nbformat.read(path, as_version=4)
  os.environ.setdefault('MPLBACKEND', 'Agg')
  NotebookClient(notebook, timeout=300, kernel_name='python3',
                 resources={'metadata': {'path': os.path.join(ROOT, 'colabs')}}).execute()
