"""Parameter and FLOP accounting; ranks and sparsities for a target parameter budget.

For a dense kernel [d_in, d_out] (P = d_in·d_out parameters):

| kind      | parameters                     | forward FLOPs per token (2 per MAC) |
| --------- | ------------------------------ | ----------------------------------- |
| dense     | d_in·d_out                     | 2·d_in·d_out                        |
| lowrank   | r·(d_in + d_out)               | 2·r·(d_in + d_out)                  |
| cola      | r·(d_in + d_out)               | 2·r·(d_in + d_out) (+ r SiLUs)      |
| lost      | r·(d_in + d_out) + n_s·d_out   | 2·r·(d_in + d_out) + 2·n_s·d_out    |
| sltrain   | r·(d_in + d_out) + ⌊δ·P⌉       | 2·d_in·d_out (densified, as SLTrain)|

with n_s = ⌊s·d_in⌋ sparse input channels (LOST) and δ the SLTrain density.
Biases, when used, add d_out to every kind. `plan(kind, d_in, d_out, ...)`
resolves the rank from a `param_fraction` of the dense count (the largest r
that stays within budget) and raises a clear error when the budget cannot be
met. Every layer in `lossland.lowrank.layers` calls the same `plan`, so the
formulas here are the ones the parameter-count tests check.
"""
from __future__ import annotations

import dataclasses
import math

KINDS = ('dense', 'lowrank', 'cola', 'lost', 'sltrain')


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """The resolved shape of one factorized linear map."""
  kind: str
  d_in: int
  d_out: int
  rank: int = 0  # r (0 for dense)
  residual_rank: int = 0  # k (LOST only)
  num_channels: int = 0  # n_s sparse input channels (LOST only)
  nnz: int = 0  # sparse nonzeros (SLTrain only)

  @property
  def dense_params(self) -> int:
    return self.d_in * self.d_out

  @property
  def params(self) -> int:
    if self.kind == 'dense':
      return self.dense_params
    return self.rank * (self.d_in + self.d_out) + self.num_channels * self.d_out + self.nnz

  @property
  def flops_per_token(self) -> int:
    """Forward matmul FLOPs for one token (backward is about 2x this)."""
    if self.kind in ('dense', 'sltrain'):
      return 2 * self.dense_params
    return 2 * self.rank * (self.d_in + self.d_out) + 2 * self.num_channels * self.d_out

  @property
  def param_fraction(self) -> float:
    return self.params / self.dense_params


def rank_for_budget(d_in: int, d_out: int, budget: float, *, layer: str = '?',
                    what: str = 'the budget') -> int:
  """Largest r with r·(d_in + d_out) ≤ budget; an error naming `layer` if r < 1."""
  r = int(math.floor(budget / (d_in + d_out) + 1e-9))
  r = min(r, min(d_in, d_out))
  if r < 1:
    raise ValueError(f'layer {layer!r} ({d_in}x{d_out}): {what} of {budget:.0f} parameters '
                     f'leaves no room for even a rank-1 factorization ({d_in + d_out} '
                     'parameters); raise param_fraction or lower the sparsity/density')
  return r


def plan(kind: str, d_in: int, d_out: int, *, rank: int | None = None,
         param_fraction: float | None = None, sparsity: float = 0.05,
         residual_rank: int | None = None, density: float = 0.03, layer: str = '?') -> LayerPlan:
  """Resolves ranks and sparse sizes of one layer.

  Args:
    kind: one of `KINDS`.
    d_in, d_out: the dense kernel's shape.
    rank: explicit r (wins over `param_fraction`).
    param_fraction: target parameters as a fraction of d_in·d_out, e.g. 0.5.
    sparsity: LOST's s: keeps ⌊s·d_in⌋ input channels.
    residual_rank: LOST's k (default min(r, min(d_in, d_out) − r)).
    density: SLTrain's δ: ⌊δ·d_in·d_out⌉ random nonzeros.
    layer: the layer's name, used in every error message.

  Raises:
    ValueError: naming the layer when the rank or sparsity exceeds its shape or
      the budget cannot be met.
  """
  if kind not in KINDS:
    raise ValueError(f'unknown low-rank kind {kind!r}; choose one of {KINDS}')
  if kind == 'dense':
    return LayerPlan('dense', d_in, d_out)
  full = min(d_in, d_out)
  num_channels = nnz = 0
  if kind == 'lost':
    if not 0.0 <= sparsity <= 1.0:
      raise ValueError(f'layer {layer!r}: sparsity {sparsity} must be in [0, 1]')
    num_channels = int(math.floor(sparsity * d_in))
  if kind == 'sltrain':
    if not 0.0 <= density <= 1.0:
      raise ValueError(f'layer {layer!r}: density {density} must be in [0, 1]')
    nnz = int(round(density * d_in * d_out))
  sparse_params = num_channels * d_out + nnz
  if rank is None:
    if param_fraction is None:
      raise ValueError(f'layer {layer!r}: give either rank or param_fraction')
    if not 0.0 < param_fraction <= 1.0:
      raise ValueError(f'layer {layer!r}: param_fraction {param_fraction} must be in (0, 1]')
    budget = param_fraction * d_in * d_out - sparse_params
    rank = rank_for_budget(d_in, d_out, budget, layer=layer,
                           what=f'param_fraction={param_fraction} after {sparse_params} sparse '
                                'parameters')
  if rank < 1:
    raise ValueError(f'layer {layer!r}: rank {rank} must be at least 1; choose a rank in '
                     f'[1, {full}] for a {d_in}x{d_out} kernel (or give param_fraction instead)')
  if rank > full:
    raise ValueError(f'layer {layer!r}: rank {rank} is outside [1, {full}] for a {d_in}x{d_out} '
                     f'kernel; choose a rank of at most {full} or a smaller param_fraction')
  k = 0
  if kind == 'lost':
    k = lost_residual_rank(rank, full, residual_rank, num_channels, layer)
  return LayerPlan(kind, d_in, d_out, rank=rank, residual_rank=k, num_channels=num_channels,
                   nnz=nnz)


def equal_param_rank(target: LayerPlan, *, layer: str = '?') -> int:
  """Rank of a plain low-rank layer with (at most) the same parameters as `target`."""
  return rank_for_budget(target.d_in, target.d_out, target.params, layer=layer,
                         what=f'the {target.kind} layer\'s parameter count')


def lost_residual_rank(rank: int, full: int, residual_rank: int | None, num_channels: int,
                       layer: str) -> int:
  """LOST's k: the residual components r < i <= r + k that score channels.

  Defaults to min(r, full - r); errors name the layer when k does not fit or
  when a full-rank factorization leaves no residual to score channels with.
  """
  k = min(rank, full - rank) if residual_rank is None else residual_rank
  if not 0 <= k <= full - rank:
    raise ValueError(f'layer {layer!r}: residual_rank {k} exceeds the {full - rank} singular '
                     f'components left after rank {rank}; use at most {full - rank}')
  if num_channels and k == 0:
    raise ValueError(f'layer {layer!r}: rank {rank} is full, so no residual subspace is left '
                     'to score channels; lower the rank or set sparsity to 0')
  return k
