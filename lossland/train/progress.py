"""A one-line progress bar on stderr: step, steps/s, ETA and the latest metrics."""
from __future__ import annotations

import sys
import time


class Progress:

  def __init__(self, total_steps: int, start_step: int = 0, stream=sys.stderr):
    self.total, self.start, self.stream = total_steps, start_step, stream
    self.t0 = time.perf_counter()

  def update(self, step: int, **metrics: float) -> None:
    elapsed = time.perf_counter() - self.t0
    rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float('nan')
    width = 24
    filled = int(width * step / max(self.total, 1))
    bar = '#' * filled + '.' * (width - filled)
    extra = '  '.join(f'{k} {v:.4f}' for k, v in metrics.items())
    eta_text = time.strftime('%H:%M:%S', time.gmtime(eta)) if eta == eta else '--:--:--'
    self.stream.write(f'\r[{bar}] {step}/{self.total}  {rate:.1f} step/s  ETA {eta_text}  {extra}')
    self.stream.flush()

  def close(self) -> None:
    self.stream.write('\n')
    self.stream.flush()
