"""Test setup: 8 fake CPU devices (set before jax is imported) and a shared data dir."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_platforms', 'cpu')


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A TFDS data dir for the embedded datasets, built once per test session."""
  path = str(tmp_path_factory.mktemp('tfds'))
  os.environ['LOSSLAND_DATA_DIR'] = path
  return path
