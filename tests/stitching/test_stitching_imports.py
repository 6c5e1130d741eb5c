"""`import lossland.stitching` pulls in neither tensorflow_datasets nor orbax (nor PIL)."""
import subprocess
import sys


def test_import_stitching_is_light():
  code = ('import sys, lossland.stitching; '
          'print([m for m in ("tensorflow_datasets", "orbax", "PIL") if m in sys.modules])')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]', out.stdout + out.stderr
