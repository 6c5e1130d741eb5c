"""AOT-compile a config's programs for a TPU topology without TPUs; per-chip memory and FLOPs.

    pip install -e ".[tpu]"      # libtpu: the TPU compiler (no TPU needed)
    python -m launch.compile --config=configs/lm/pydoc_byte.py --topology=v5e:2x2
    python -m launch.compile --config=configs/compile/olmo2_7b_kfac.py --topology=v5e:16x16 \
        --workdir=/tmp/olmo_kfac
    python -m launch.compile --config=configs/compile/llama_1b_lost.py --find_smallest

Ahead-of-time compilation as in MaxText's `train_compile.py`: the topology's
devices come from `jax.experimental.topologies.get_topology_desc` (abstract
TPU devices, compiled for by libtpu on the CPU host), the config's mesh is
laid over them, and every program is lowered on `jax.ShapeDtypeStruct`s that
carry their `NamedSharding`s, so nothing is allocated and no data is read.

Programs (`compile.programs`, comma-separated):
  train     one optimizer step (`lossland.train.make_train_block`, 1 step), the
            params, AdamW moments and batch as the config shards them;
  fwd_bwd   loss and gradient of one batch (the denominator of the FLOPs ratio);
  kfac      one K-FAC accumulation step (`curvature.factors.factor_sums` of
            `kfac.select`, added to running sums) with the factor sums
            stacked per layer shape and sharded over the layer axis;
  eig_edit  the eigendecomposition of every factor and the edit of every
            selected kernel (`curvature.edit.mass_mask` and `apply_mask`,
            keeping `kfac.rho` of the curvature mass): layer-parallel, each
            device group takes its own layers one at a time
            (`layer_parallel_eig_edit`: shard_map + lax.map);
  sd_sample a whole Stable Diffusion sampling scan of a guidance arm, and the
            largest seed batch per chip that fits (`launch.compile_sd`; the
            config's `sd` section, e.g. configs/compile/sd15_astar.py).

For each program it prints and writes (`WORKDIR/compile.json`, or stdout
only) the per-device bytes of arguments, outputs, aliased (donated) buffers,
temporaries and generated code from `memory_analysis()`, their total against
the chip's HBM, the per-device FLOPs of `cost_analysis()`, and the compile
time. A program that does not fit stops the command with an error naming the
chip and the bytes; `--find_smallest` instead tries the chip's topologies from
small to large (the mesh's inferred axis, -1, takes the devices) and reports
the first where every program fits.

`model.matmul_dtype='auto'` means bfloat16 here (TPUs have bfloat16 MXUs).
Keys read beyond the training config (all optional): `compile.programs`,
`compile.param_dtype` (params and moments stored in this dtype),
`compile.fsdp` (append `parallel.fsdp_rules` over `data`),
`compile.residual_sharding` (constrain the transformer's residual stream to
batch over `data`, replicated over `model`: `TransformerLM.residual_sharding`),
`compile.vocab_size`
(when the config's vocabulary comes from a data file), `kfac.select`,
`kfac.batch_size`, `kfac.rho`, `kfac.eigh` (eig_edit's eigensolver: auto, i.e. QDWH
on TPU, or jacobi, libtpu's kernel, which compiles in seconds where QDWH takes
the host's memory: docs/results/pod_compile.md), `lowrank.kind` and its layer fields
(`param_fraction`, `sparsity`, `gamma`, ...).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Sequence

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compile only: never start a TPU runtime
# libtpu takes /tmp/libtpu_lockfile so that one process owns the TPU chips; compiling for
# an abstract topology owns none, so concurrent compiles (test workers) may load it.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from launch import common, config_cli  # noqa: E402
from lossland import curvature, lowrank, parallel  # noqa: E402
from lossland import train as train_lib  # noqa: E402
from lossland.errors import UserError  # noqa: E402
from lossland.curvature import edit as edit_lib  # noqa: E402
from lossland.curvature import eigen as eigen_lib  # noqa: E402
from lossland.curvature import factors as factors_lib  # noqa: E402
from lossland.train import steps as steps_lib  # noqa: E402

GiB = 2 ** 30
# HBM per chip by the device_kind libtpu reports, and each generation's topologies from
# small to large (what --find_smallest tries; single-slice shapes of each generation).
CHIPS = {
    'v5e': ('TPU v5 lite', 16 * GiB, ('2x2', '2x4', '4x4', '4x8', '8x8', '8x16', '16x16')),
    'v6e': ('TPU v6 lite', 32 * GiB, ('2x2', '2x4', '4x4', '4x8', '8x8', '8x16', '16x16')),
    'v4': ('TPU v4', 32 * GiB, ('2x2x1', '2x2x2', '2x2x4', '2x4x4', '4x4x4', '4x4x8', '4x8x8',
                                '8x8x8', '8x8x16')),
    'v5p': ('TPU v5', 95 * GiB, ('2x2x1', '2x2x2', '2x2x4', '2x4x4', '4x4x4', '4x4x8', '4x8x8',
                                 '8x8x8', '8x8x16')),
}
PROGRAMS = ('train', 'fwd_bwd', 'kfac', 'eig_edit', 'sd_sample')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class CompileError(UserError):
  """Bad input to `launch.compile` or a program that does not fit: one clear message."""


class DoesNotFit(CompileError):
  """Some program needs more bytes per chip than its HBM; `.report` has every figure."""

  def __init__(self, message: str, report: dict | None = None):
    super().__init__(message)
    self.report = report


def libtpu_available() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def topology_devices(name: str) -> list:
  """The abstract TPU devices of topology `name` (e.g. 'v5e:16x16'); CompileError if unknown.

  The shape has as many dimensions as the chip's interconnect: two for v5e and v6e
  (AxB), three for v4 and v5p (AxBxC); libtpu itself accepts some shapes a chip
  does not have (v5e:2x2x2), so they are refused here.
  """
  chip, _, shape = name.partition(':')
  if chip not in CHIPS or not re.fullmatch(r'\d+(x\d+){1,2}', shape):
    raise CompileError(f'unknown topology {name!r}; give <chip>:<shape> with chip one of '
                       f'{sorted(CHIPS)}, e.g. v5e:2x2, v5e:16x16, v4:2x2x2')
  dims = [int(d) for d in shape.split('x')]
  rank = CHIPS[chip][2][0].count('x') + 1
  if len(dims) != rank or min(dims) < 1:
    form = 'x'.join('ABC'[:rank])
    raise CompileError(f'topology {name!r}: {chip} chips form a {rank}D torus ({chip}:{form}, '
                       f'each at least 1); valid {chip} topologies: '
                       f'{", ".join(smaller_topologies(chip))}')
  if not libtpu_available():
    raise CompileError('compiling for TPU needs libtpu, the TPU compiler: pip install -e ".[tpu]" '
                       '(works on a machine without TPUs)')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(topology_name=name, platform='tpu').devices)
  except Exception as e:  # noqa: BLE001 - libtpu raises JaxRuntimeError for bad shapes
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CompileError(f'libtpu does not know topology {name!r} ({first}); valid {chip} shapes '
                       f'include {", ".join(CHIPS[chip][2])}') from None


def chip_hbm(devices) -> tuple[str, int]:
  kind = devices[0].device_kind
  for _, (device_kind, hbm, _) in CHIPS.items():
    if device_kind == kind:
      return kind, hbm
  raise CompileError(f'no HBM size known for TPU kind {kind!r}; add it to launch.compile.CHIPS')


def topology_mesh(mesh_config, devices) -> Mesh:
  """The config's mesh over the topology's devices; CompileError when the sizes disagree."""
  axes = {'data': int(mesh_config.data), 'model': int(mesh_config.model)}
  try:
    return parallel.make_mesh(axes, devices)
  except ValueError as e:
    raise CompileError(f'config mesh {axes} (config keys mesh.data, mesh.model) does not match '
                       f'the topology\'s {len(devices)} devices: {e}') from None


# ---------------------------------------------------------------------------- the model


def _vocab_size(config) -> int:
  """compile.vocab_size, else model.vocab_size, else the byte vocabulary; each checked >= 1."""
  for key, section in (('compile.vocab_size', config.get('compile')),
                       ('model.vocab_size', config.model)):
    value = section.get('vocab_size') if section is not None else None
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise CompileError(f'{key}={value!r} must be a positive number of tokens; set '
                         f'--config.{key}=N')
    return value
  if config.data.get('vocab') == 'byte':
    from lossland import data as data_lib  # pylint: disable=g-import-not-at-top
    return data_lib.Vocab().size
  raise CompileError(f'the vocabulary of data.vocab={config.data.get("vocab")!r} comes from the '
                     'data; give its size with --vocab_size=N (e.g. 65 for '
                     'tiny Shakespeare\'s characters)')


def build_model(config):
  fields = config.model.to_dict()
  if fields.get('matmul_dtype') == 'auto':
    fields['matmul_dtype'] = 'bfloat16'  # TPUs have bfloat16 matrix units
  overrides = {'vocab_size': _vocab_size(config)}
  fields.pop('vocab_size', None)
  model_config = ml_collections.ConfigDict(fields)
  low = config.get('lowrank')
  if low is not None and low.get('kind', 'dense') != 'dense':
    layer = {k: v for k, v in low.items() if k in _LAYER_FIELDS}
    overrides['dense'] = lowrank.dense_factory(low.kind, **layer)
  return common.build_model(model_config, **overrides)


_LAYER_FIELDS = ('param_fraction', 'sparsity', 'gamma', 'activation', 'factor_init', 'seed',
                 'rank')


@dataclasses.dataclass
class Built:
  """What every program shares: the model, its abstract params and their shardings."""
  model: Any
  mesh: Mesh
  params: Any  # ShapeDtypeStructs with shardings
  rules: list
  batch_size: int
  seq_len: int


def _setting(config, section: str, key: str, default):
  sub = config.get(section)
  return sub.get(key, default) if sub is not None else default


def _eigh_method(config) -> str:
  """`kfac.eigh`, the eigensolver of eig_edit (`eigen.EIGH_METHODS`), checked."""
  method = str(_setting(config, 'kfac', 'eigh', 'auto'))
  try:
    return eigen_lib.check_eigh_method(method)
  except ValueError as e:
    raise CompileError(f'--config.kfac.eigh: {e}') from None


def build(config, mesh: Mesh) -> Built:
  model = build_model(config)
  if _setting(config, 'compile', 'residual_sharding', False):  # TransformerLM.residual_sharding
    model = model.clone(residual_sharding=NamedSharding(mesh, P('data', None, None)))
  t = config.train
  example = jnp.zeros((1, t.seq_len), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), example)
  dtype = _setting(config, 'compile', 'param_dtype', '')
  if dtype:
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, DTYPES[dtype] if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype), params)
  rules = common.param_rules(config)
  if _setting(config, 'compile', 'fsdp', False):
    rules = list(rules) + parallel.fsdp_rules(params, mesh)
  try:
    shardings = parallel.param_shardings(params, mesh, rules)
  except ValueError as e:
    raise CompileError(f'param_rules on mesh {dict(mesh.shape)}: {e}') from None
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        params, shardings)
  return Built(model, mesh, params, rules, int(t.batch_size), int(t.seq_len))


def _abstract(shape, dtype, mesh, spec) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _batch(b: Built, batch_size: int, *, leading: tuple = ()) -> dict:
  if batch_size % b.mesh.shape['data']:
    raise CompileError(f'batch size {batch_size} is not divisible by the data axis '
                       f'({b.mesh.shape["data"]} devices); change train.batch_size (or '
                       'kfac.batch_size) or the mesh')
  spec = P(*([None] * len(leading)), 'data', None)
  shape = (*leading, batch_size, b.seq_len)
  return {'inputs': _abstract(shape, jnp.int32, b.mesh, spec),
          'targets': _abstract(shape, jnp.int32, b.mesh, spec)}


def _rng(mesh) -> jax.ShapeDtypeStruct:
  key = jax.eval_shape(lambda: jax.random.key(0))
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))


# ---------------------------------------------------------------------------- the programs


def train_program(config, b: Built):
  """One optimizer step of `train.fit` (a one-step block), lowered on abstract state."""
  optimizer = common.build_optimizer(config.train)
  loss_fn = train_lib.next_token_loss(b.model.apply)
  state = jax.eval_shape(lambda p: steps_lib.init_train_state(p, optimizer), b.params)
  param_shardings = jax.tree.map(lambda x: x.sharding, b.params)
  state_sharding = steps_lib.state_shardings(state, b.mesh, param_shardings)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                       state_sharding)
  block = steps_lib.make_train_block(loss_fn, optimizer, state_sharding=state_sharding,
                                     mesh=b.mesh)
  return block.lower(state, _batch(b, b.batch_size, leading=(1,)), _rng(b.mesh))


def fwd_bwd_program(config, b: Built, batch_size: int | None = None):
  """Loss and gradient of one batch: forward + backward, no optimizer."""
  del config
  loss_fn = train_lib.next_token_loss(b.model.apply)
  grad_shardings = jax.tree.map(lambda x: x.sharding, b.params)
  fn = jax.jit(lambda p, batch, rng: jax.value_and_grad(loss_fn, has_aux=True)(p, batch, rng),
               out_shardings=((NamedSharding(b.mesh, P()), None), grad_shardings))
  return fn.lower(b.params, _batch(b, batch_size or b.batch_size), _rng(b.mesh))


def _kfac_layers(config, b: Built):
  select = _setting(config, 'kfac', 'select', r'block_\d+/mlp/(gate|up)')
  example = jax.ShapeDtypeStruct((1, b.seq_len), jnp.int32)
  found = {}

  def trace(params, inputs):  # find_layers wants arrays: give it tracers of the abstract params
    found['views'] = curvature.find_layers(b.model.apply, params, inputs, select=select)
    return 0

  jax.eval_shape(trace, b.params, example)
  views = found['views']
  groups: dict[tuple[int, int], list[str]] = {}
  for name, calls in views.items():
    groups.setdefault((calls[0].rows_in, calls[0].d_out), []).append(name)
  return views, groups


def layer_axis_spec(mesh: Mesh, count: int) -> P:
  """Shards a stack of `count` layers over as many mesh axes as divide it (data first)."""
  axes = []
  size = 1
  for axis in ('data', 'model'):
    if count % (size * mesh.shape[axis]) == 0:
      axes.append(axis)
      size *= mesh.shape[axis]
  return P(tuple(axes) if axes else None, None, None)


def _stack_sums(b: Built, groups, dtype):
  """Abstract stacked sums per shape group: A [L, d_in, d_in], G [L, d_out, d_out], count [L]."""
  out = {}
  for (d_in, d_out), names in groups.items():
    spec = layer_axis_spec(b.mesh, len(names))
    out[f'{d_in}x{d_out}'] = factors_lib.FactorSums(
        _abstract((len(names), d_in, d_in), dtype, b.mesh, spec),
        _abstract((len(names), d_out, d_out), dtype, b.mesh, spec),
        _abstract((len(names),), dtype, b.mesh, P(spec[0])))
  return out


def kfac_program(config, b: Built):
  """One K-FAC accumulation step whose factor sums are stacked per shape and layer-sharded.

  The per-layer sums of `factors.factor_sums` are stacked by layer shape, and
  the stack is sharded over the layer axis: the contraction over the
  data-sharded tokens then ends in a reduce-scatter, and each device keeps
  1/#devices-groups of the factors instead of all of them.
  """
  views, groups = _kfac_layers(config, b)
  batch_size = int(_setting(config, 'kfac', 'batch_size', b.batch_size))
  sums = _stack_sums(b, groups, jnp.float32)
  shardings = jax.tree.map(lambda x: x.sharding, sums)
  names = tuple(views)

  def accumulate(sums, params, batch, rng):
    new = factors_lib.factor_sums(b.model.apply, params, batch, rng, layers=names)
    out = {}
    for key, stacked in sums.items():
      d_in, d_out = map(int, key.split('x'))
      group = groups[(d_in, d_out)]
      add = factors_lib.FactorSums(*(jnp.stack([getattr(new[n], f) for n in group])
                                     for f in ('A', 'G', 'count')))
      out[key] = jax.tree.map(jnp.add, stacked, add)
    return out

  fn = jax.jit(accumulate, donate_argnums=0, out_shardings=shardings)
  return fn.lower(sums, b.params, _batch(b, batch_size), _rng(b.mesh)), batch_size


def layer_parallel_eig_edit(sums: factors_lib.FactorSums, kernels: jax.Array, rho: float,
                            mesh: Mesh, spec: P, eigh_method: str = 'auto') -> jax.Array:
  """Edited kernels [L, d_in, d_out] of a layer stack whose layer axis is sharded by `spec`.

  Each device group (the devices that share a slice of the layer axis) takes
  only its own layers (`shard_map`) and runs them one after the other
  (`lax.map`), so one layer's eigendecompositions, pair mass, mask and edit are
  live at a time. Per layer it computes what the library does:
  `eigen.layer_eigenbasis` of the mean factors A/n and G/n (n = max(count, 1)),
  `edit.mass_mask` of λ_i μ_j at ρ (as `edit.curvature_masks`) and
  `edit.apply_mask` (Merullo et al. 2025, sec. 3.2). `sums` holds the stacked
  A [L, d_in, d_in], G [L, d_out, d_out] and count [L]; `eigh_method` is
  `eigen.layer_eigenbasis`'s solver (`eigen.EIGH_METHODS`); jit-safe.
  """
  rho = edit_lib.check_rho(rho)
  eigh_method = eigen_lib.check_eigh_method(eigh_method)
  layer_spec = P(spec[0])

  def one_layer(args):
    a, g, count, w = args
    n = jnp.maximum(count, 1.0)
    ua, lam, ug, mu = eigen_lib.layer_eigenbasis(a / n, g / n, eigh_method)
    mask = edit_lib.mass_mask(lam[:, None] * mu[None, :], rho)
    return edit_lib.apply_mask(w, ua, ug, mask)

  def local(a, g, count, w):  # this device group's layers, one at a time
    return jax.lax.map(one_layer, (a, g, count, w))

  # check_vma=False: TPU's eigh expands into loops whose replicated loop flags the varying-
  # axes check rejects inside shard_map. Nothing crosses devices here: every output is a
  # function of its own device's layers, identical on the devices that share them.
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, layer_spec, spec),
                       out_specs=spec, check_vma=False)(sums.A, sums.G, sums.count, kernels)


def eig_edit_program(config, b: Built):
  """Layer-parallel eigendecomposition of the stacked factors, then the edit of every kernel.

  The kernels of each shape group are stacked and resharded like the factor
  stack (layer axis over the mesh), then `layer_parallel_eig_edit` decomposes
  and edits each device group's own layers one at a time (no factor is
  gathered onto another device; the devices of a group that share a layer
  compute it redundantly), and the edited kernels go back to their params'
  sharding.
  """
  _, groups = _kfac_layers(config, b)
  rho = float(_setting(config, 'kfac', 'rho', 0.6))
  eigh_method = _eigh_method(config)
  sums = _stack_sums(b, groups, jnp.float32)
  flat = {parallel.path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(b.params)[0]}
  kernel_paths = {}
  for key in sums:
    d_in, d_out = map(int, key.split('x'))
    paths = []
    for name in groups[(d_in, d_out)]:
      matches = [p for p in flat if p.endswith(f'{name}/kernel')]
      if len(matches) != 1:
        raise CompileError(f'eig_edit needs one kernel for layer {name!r}; found {matches}')
      if tuple(flat[matches[0]].shape) != (d_in, d_out):
        raise CompileError(f'eig_edit edits [d_in, d_out] kernels; {matches[0]} has shape '
                           f'{flat[matches[0]].shape}, its factors ({d_in}, {d_out})')
      paths.append(matches[0])
    kernel_paths[key] = paths
  kernels = {key: [flat[p] for p in paths] for key, paths in kernel_paths.items()}
  specs = {key: s.A.sharding.spec for key, s in sums.items()}

  def eig_edit(sums, kernels):
    out = {}
    for key, s in sums.items():
      w = jax.lax.with_sharding_constraint(jnp.stack(kernels[key]),
                                           NamedSharding(b.mesh, specs[key]))
      edited = layer_parallel_eig_edit(s, w, rho, b.mesh, specs[key], eigh_method)
      out[key] = [edited[i] for i in range(len(kernels[key]))]
    return out

  out_shardings = {key: [k.sharding for k in ks] for key, ks in kernels.items()}
  fn = jax.jit(eig_edit, out_shardings=out_shardings)
  return fn.lower(sums, kernels)


# ---------------------------------------------------------------------------- reporting


def memory_report(compiled, hbm: int) -> dict:
  m = compiled.memory_analysis()
  report = {'argument_bytes': int(m.argument_size_in_bytes),
            'output_bytes': int(m.output_size_in_bytes),
            'alias_bytes': int(m.alias_size_in_bytes),
            'temp_bytes': int(m.temp_size_in_bytes),
            'generated_code_bytes': int(m.generated_code_size_in_bytes)}
  # Donated (aliased) inputs share their buffers with outputs: count them once.
  report['total_bytes'] = (report['argument_bytes'] + report['output_bytes']
                           - report['alias_bytes'] + report['temp_bytes']
                           + report['generated_code_bytes'])
  report['hbm_fraction'] = report['total_bytes'] / hbm
  return report


def flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get('flops', math.nan))


def compile_all(config, topology: str, programs: Sequence[str]) -> dict:
  """Compiles `programs` for `topology`; returns the report (raises DoesNotFit when over HBM)."""
  if 'sd_sample' in programs:
    if list(programs) != ['sd_sample']:
      raise CompileError(f'sd_sample compiles alone (a Stable Diffusion config has no LM '
                         f'programs); got {list(programs)}')
    from launch import compile_sd  # pylint: disable=g-import-not-at-top
    return compile_sd.compile_sd(config, topology)
  devices = topology_devices(topology)
  kind, hbm = chip_hbm(devices)
  mesh = topology_mesh(config.mesh, devices)
  b = build(config, mesh)
  report = {'topology': topology, 'chip': kind, 'devices': len(devices),
            'hbm_bytes_per_chip': hbm, 'mesh': dict(mesh.shape),
            'param_count': int(sum(math.prod(x.shape) for x in jax.tree.leaves(b.params))),
            'programs': {}}
  makers: dict[str, Callable] = {
      'train': lambda: (train_program(config, b), b.batch_size),
      'fwd_bwd': lambda: (fwd_bwd_program(config, b), b.batch_size),
      'kfac': lambda: kfac_program(config, b),
      'eig_edit': lambda: (eig_edit_program(config, b), None),
  }
  too_big = []
  for name in programs:
    t0 = time.perf_counter()
    lowered, batch_size = makers[name]()
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      # libtpu refuses programs whose temporaries cannot fit: its message names the bytes.
      message = str(e).strip().splitlines()[0]
      report['programs'][name] = {'error': message,
                                  'compile_seconds': time.perf_counter() - t0}
      too_big.append(f'{name}: {message}')
      continue
    entry = memory_report(compiled, hbm)
    entry.update(flops_per_device=flops(compiled), compile_seconds=time.perf_counter() - t0)
    if batch_size is not None:
      entry['batch_size'] = batch_size
    report['programs'][name] = entry
    print(f'{topology} {name}: {entry["total_bytes"] / GiB:.3f} GiB per chip, '
          f'{entry["flops_per_device"] / 1e9:.1f} GFLOP per chip, compiled in '
          f'{entry["compile_seconds"]:.1f} s', file=sys.stderr, flush=True)
    if entry['total_bytes'] > hbm:
      too_big.append(f'{name} needs {entry["total_bytes"]:,} bytes per chip '
                     f'({entry["total_bytes"] / GiB:.2f} GiB: arguments {entry["argument_bytes"]:,}'
                     f', outputs {entry["output_bytes"]:,}, aliased {entry["alias_bytes"]:,}, '
                     f'temporaries {entry["temp_bytes"]:,}, code '
                     f'{entry["generated_code_bytes"]:,})')
  if 'kfac' in report['programs'] and 'error' not in report['programs']['kfac']:
    k = report['programs']['kfac']
    # The ratio at equal batch: one K-FAC accumulation step against fwd+bwd of the same batch.
    fb = report['programs'].get('fwd_bwd', {})
    if fb.get('batch_size') == k['batch_size'] and 'flops_per_device' in fb:
      fb_flops = fb['flops_per_device']
    else:
      fb_flops = flops(fwd_bwd_program(config, b, k['batch_size']).compile())
    report['kfac_over_fwd_bwd_flops'] = k['flops_per_device'] / fb_flops
  if too_big:
    raise DoesNotFit(f'does not fit {topology} ({kind}, {hbm:,} bytes = {hbm / GiB:.0f} GiB of '
                     f'HBM per chip): ' + '; '.join(too_big) + '. Use a larger topology '
                     '(--find_smallest), shard more (param_rules, compile.fsdp, mesh.model) or '
                     'use a smaller batch.', report)
  return report


def smaller_topologies(chip: str) -> list[str]:
  return [f'{chip}:{shape}' for shape in CHIPS[chip][2]]


def find_smallest(config, chip: str, programs: Sequence[str], log=print) -> dict:
  """The report of the smallest `chip` topology on which every program fits.

  The mesh needs an inferred axis (-1) to grow with the topology; topologies
  whose device count the mesh or batch cannot use are skipped.
  """
  if -1 not in (int(config.mesh.data), int(config.mesh.model)):
    raise CompileError(f'--find_smallest needs a mesh axis of -1 to grow with the topology; '
                       f'the config has mesh {dict(config.mesh)}')
  tried = []
  for topology in smaller_topologies(chip):
    try:
      report = compile_all(config, topology, programs)
    except DoesNotFit as e:
      tried.append(topology)
      log(f'{topology}: {e}')
      continue
    except CompileError as e:
      tried.append(topology)
      log(f'{topology}: skipped ({e})')
      continue
    report['tried_before'] = tried
    return report
  raise DoesNotFit(f'no {chip} topology up to {tried[-1]} fits: tried {", ".join(tried)}')


def format_report(report: dict) -> str:
  if 'sd_sample' in report['programs']:
    from launch import compile_sd  # pylint: disable=g-import-not-at-top
    return compile_sd.format_report(report)
  lines = [f'{report["topology"]} ({report["chip"]}, {report["devices"]} chips, '
           f'{report["hbm_bytes_per_chip"] / GiB:.0f} GiB HBM each), mesh {report["mesh"]}, '
           f'{report["param_count"]:,} params']
  lines.append(f'{"program":<9} {"args GiB":>9} {"out GiB":>8} {"alias":>7} {"temp GiB":>9} '
               f'{"code MiB":>8} {"total GiB":>9} {"of HBM":>7} {"GFLOP/chip":>11} '
               f'{"compile s":>9}')
  for name, e in report['programs'].items():
    if 'error' in e:
      lines.append(f'{name:<9} does not fit: {e["error"]}')
      continue
    lines.append(f'{name:<9} {e["argument_bytes"] / GiB:9.3f} {e["output_bytes"] / GiB:8.3f} '
                 f'{e["alias_bytes"] / GiB:7.3f} {e["temp_bytes"] / GiB:9.3f} '
                 f'{e["generated_code_bytes"] / 2 ** 20:8.1f} {e["total_bytes"] / GiB:9.3f} '
                 f'{e["hbm_fraction"]:7.1%} {e["flops_per_device"] / 1e9:11.1f} '
                 f'{e["compile_seconds"]:9.1f}')
  if 'kfac_over_fwd_bwd_flops' in report:
    lines.append(f'K-FAC accumulation / forward+backward FLOPs at batch '
                 f'{report["programs"]["kfac"]["batch_size"]}: '
                 f'{report["kfac_over_fwd_bwd_flops"]:.3f}')
  return '\n'.join(lines)


def parse(argv: Sequence[str]):
  common.quiet_platforms()  # before libtpu loads: no metadata-server errors without TPU chips
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True, help='configs/<topic>/<exp>.py[:arg]')
  parser.add_argument('--topology', default=None, help='e.g. v5e:2x2, v5e:16x16, v4:2x2x2')
  parser.add_argument('--find_smallest', default=None, metavar='CHIP', nargs='?', const='v5e',
                      help='try CHIP\'s topologies from small to large (default chip v5e)')
  parser.add_argument('--programs', default=None,
                      help=f'comma-separated subset of {",".join(PROGRAMS)} (default: the '
                           'config\'s compile.programs, else train)')
  parser.add_argument('--workdir', default=None, help='writes WORKDIR/compile.json')
  parser.add_argument('--vocab_size', type=int, default=None,
                      help='vocabulary size when the config\'s comes from its data (e.g. 65 for '
                           'tiny Shakespeare\'s characters)')
  args, rest = parser.parse_known_args(argv)
  config_cli.check_workdir(args.workdir)
  if args.vocab_size is not None and args.vocab_size < 1:
    raise CompileError(f'--vocab_size={args.vocab_size} must be at least 1: the number of tokens '
                       '(e.g. 65 for tiny Shakespeare\'s characters)')
  if (args.topology is None) == (args.find_smallest is None):
    raise CompileError('give exactly one of --topology=v5e:16x16 or --find_smallest[=v5e]')
  if args.find_smallest is not None and args.find_smallest not in CHIPS:
    raise CompileError(f'--find_smallest={args.find_smallest!r}: chip must be one of '
                       f'{sorted(CHIPS)}')
  config = config_cli.load_config_file(args.config)
  for item in rest:
    if not item.startswith('--config.') or '=' not in item:
      raise CompileError(f'unrecognized argument {item!r}; overrides look like --config.key=value')
    key, _, value = item[len('--config.'):].partition('=')
    config_cli.apply_override(config, key, value)
  config_cli.validate(config, num_devices=None)
  if args.vocab_size is not None:
    config.model.vocab_size = args.vocab_size  # a new key: the config is not locked yet
    if config.get('compile') is not None and 'vocab_size' in config.compile:
      config.compile.vocab_size = args.vocab_size  # the flag wins over the config's own
  programs = args.programs or _setting(config, 'compile', 'programs', 'train')
  programs = [p.strip() for p in programs.split(',') if p.strip()]
  unknown = [p for p in programs if p not in PROGRAMS]
  if unknown:
    raise CompileError(f'unknown program(s) {unknown}; choose from {", ".join(PROGRAMS)}')
  if 'eig_edit' in programs:
    _eigh_method(config)  # before minutes of compiling the other programs
  if programs != ['sd_sample']:
    _vocab_size(config)  # a bad vocabulary size is named before libtpu loads
  return args, config, programs


def run(argv: Sequence[str]) -> dict:
  args, config, programs = parse(argv)
  if args.find_smallest is not None:
    report = find_smallest(config, args.find_smallest, programs,
                           log=lambda line: print(line, file=sys.stderr))
  else:
    report = compile_all(config, args.topology, programs)
  report['config'] = args.config
  print(format_report(report))
  if args.workdir:
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, 'compile.json'), 'w') as f:
      json.dump(report, f, indent=2, sort_keys=True)
  return report


def main(argv=None) -> None:
  try:
    with config_cli.user_errors():
      run(sys.argv[1:] if argv is None else argv)
  except SystemExit as e:
    if isinstance(e.code, str):  # a user error: one line, exit status 1
      print(e.code, file=sys.stderr)
      raise SystemExit(1) from None
    raise


if __name__ == '__main__':
  main()
