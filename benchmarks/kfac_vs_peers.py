"""K-FAC factors: lossland against kfac-jax and curvlinops, and each against a gradient step.

    pip install -e . -r benchmarks/requirements.txt
    python -m benchmarks.kfac_vs_peers [--model mlp|transformer|both] [--devices N] [--rounds R]
    taskset -c 0 python -m benchmarks.kfac_vs_peers ...   # one core for every library

Two models, each with the same weights and the same batches in every library:

- `mlp`: 4 hidden tanh layers of 1024 (input 1024, 10 classes, biases), batch
  512, 20 batches; every Dense is a K-FAC layer (5).
- `transformer`: `lossland.models.transformer.TransformerLM` (d_model 256, 4
  blocks, 4 heads, SwiGLU 1024, byte vocabulary 256, untied head), sequences of
  128, batch 16, 10 batches; every linear layer (29) is a K-FAC layer. Its
  PyTorch twin `TorchLM` below computes the same logits from the same weights.

Contenders (one call = all batches, the work done once the call returns):

- `lossland`: `lossland.curvature.estimate_factors`, the public call (true
  Fisher: one target sampled per position from the model's softmax).
- `lossland_steady`: the same accumulator (`make_factor_accumulator`, one
  partial sum per device on several devices) over batches already on the
  devices: the compiled work alone, without the host loop of the public call.
- `lossland_grad`: lossland's own gradient step, a jitted `value_and_grad` of
  the mean cross-entropy per batch (the batches placed like the factors').
- `kfac_jax`: `BlockDiagonalCurvature.update_curvature_matrix_estimate` per
  batch in mode 'fisher_gradients' (the same sampled-target Fisher), jitted,
  factors summed (ema 1, 1); no inversion or eigendecomposition.
- `curvlinops`: `KFACLinearOperator(..., fisher_type=FisherType.MC,
  mc_samples=1, kfac_approx='expand')` and its `compute_kronecker_factors()`
  (factors only).
- `torch_grad` (transformer): forward, mean cross-entropy, backward in PyTorch.

All three K-FAC contenders compute the same Fisher type: the Monte-Carlo
("true") Fisher with one sampled label per loss term, each token a sample
(KFAC-expand). Their random labels differ, so the agreement check first runs
all three with the *empirical* Fisher (dataset labels, deterministic) on a small
model of each kind and prints the largest relative difference of every factor
after dividing each by its trace (the libraries normalize by different
counts: kfac-jax by examples rather than tokens and, for the empirical Fisher,
by the batch size once more). Factors that differ by more than 1e-4 are named:
kfac-jax's `RepeatedDenseKroneckerFactored` drops from A the positions whose
output gradient is exactly zero (its masking heuristic); under causal
attention the query of position 0 has a zero gradient, so the query layers'
A differs by a few percent there and nowhere else.

Threads: XLA:CPU and PyTorch both use every core of the process's affinity
mask (`side_by_side.threads()`; PyTorch is set to it explicitly). `--devices N`
sets `--xla_force_host_platform_device_count=N` before jax is imported, so
lossland (its mesh is all local devices) and its gradient step shard each
batch over N emulated CPU devices; kfac-jax gets the same sharded batches.
"""
from __future__ import annotations

import argparse
import os
import sys


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', choices=('mlp', 'transformer', 'both'), default='both')
  p.add_argument('--devices', type=int, default=1, help='emulated XLA:CPU devices')
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--batches', type=int, default=None,
                 help='batches per call (default: 20 for the MLP, 10 for the transformer)')
  p.add_argument('--no-check', action='store_true', help='skip the agreement check')
  return p.parse_args(argv)


ARGS = _parse(sys.argv[1:]) if __name__ == '__main__' else None
if ARGS is not None:  # must precede the jax import
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={ARGS.devices}').strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.extend  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import kfac_jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from curvlinops import KFACLinearOperator  # noqa: E402
from curvlinops.kfac import FisherType  # noqa: E402

from benchmarks import side_by_side  # noqa: E402
from lossland import parallel  # noqa: E402
from lossland.curvature import capture, factors as factors_lib  # noqa: E402
from lossland.models.transformer import TransformerLM  # noqa: E402
from lossland.parallel import dispatch  # noqa: E402


def _kfac_jax_on_new_jax():
  """kfac-jax 0.0.8 unpacks `Primitive.get_bind_params` as (subfuns, params); jax 0.10 returns
  one dict with the subfunctions under 'subfuns'. Replaces its one caller (same semantics)."""
  from kfac_jax._src import tag_graph_matcher as tgm
  if isinstance(jax.extend.core.Primitive('probe').get_bind_params({}), tuple):
    return

  def eval_jaxpr_eqn(eqn, in_values):
    params = dict(eqn.primitive.get_bind_params(eqn.params))
    subfuns = params.pop('subfuns', ())
    with jax.extend.source_info_util.user_context(eqn.source_info.traceback):
      output = eqn.primitive.bind(*subfuns, *in_values, **params)
    return output if isinstance(output, list) else [output]

  tgm.eval_jaxpr_eqn = eval_jaxpr_eqn


_kfac_jax_on_new_jax()


# ---------------------------------------------------------------- models, twins

class TanhMLP(nn.Module):
  widths: tuple[int, ...]
  classes: int

  @nn.compact
  def __call__(self, x):
    for i, w in enumerate(self.widths):
      x = jnp.tanh(nn.Dense(w, name=f'dense_{i}')(x))
    return nn.Dense(self.classes, name='head')(x)


def torch_mlp(params) -> torch.nn.Module:
  """The TanhMLP with the same weights (torch Linear weight = kernelᵀ)."""
  p = params['params']
  names = sorted((k for k in p if k.startswith('dense_')), key=lambda k: int(k[6:])) + ['head']
  layers = []
  for i, name in enumerate(names):
    k = np.asarray(p[name]['kernel'])
    lin = torch.nn.Linear(*k.shape)
    with torch.no_grad():
      lin.weight.copy_(torch.from_numpy(k.T.copy()))
      lin.bias.copy_(torch.from_numpy(np.asarray(p[name]['bias'])))
    layers += [lin] + ([torch.nn.Tanh()] if i < len(names) - 1 else [])
  return torch.nn.Sequential(*layers)


class TorchBlock(torch.nn.Module):

  def __init__(self, d, heads, mlp):
    super().__init__()
    self.heads = heads
    self.attn_norm = torch.nn.RMSNorm(d, eps=1e-6)
    self.mlp_norm = torch.nn.RMSNorm(d, eps=1e-6)
    self.query, self.key, self.value, self.out = (torch.nn.Linear(d, d, bias=False)
                                                  for _ in range(4))
    self.gate, self.up = (torch.nn.Linear(d, mlp, bias=False) for _ in range(2))
    self.down = torch.nn.Linear(mlp, d, bias=False)

  def forward(self, x, sin, cos):
    b, t, d = x.shape
    h = self.attn_norm(x)
    split = lambda y: y.view(b, t, self.heads, d // self.heads)

    def rotate(y):  # lossland.models.transformer.rotary_embedding
      half = y.shape[-1] // 2
      y1, y2 = y[..., :half], y[..., half:]
      return torch.cat([y1 * cos - y2 * sin, y2 * cos + y1 * sin], dim=-1)

    q, k = rotate(split(self.query(h))), rotate(split(self.key(h)))
    v = split(self.value(h))
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True)
    x = x + self.out(o.transpose(1, 2).reshape(b, t, d))
    h = self.mlp_norm(x)
    return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TorchLM(torch.nn.Module):
  """`TransformerLM` (float32, untied head) in PyTorch; `forward(tokens) -> logits`."""

  def __init__(self, vocab, d, layers, heads, mlp):
    super().__init__()
    self.embed = torch.nn.Embedding(vocab, d)
    self.blocks = torch.nn.ModuleList(TorchBlock(d, heads, mlp) for _ in range(layers))
    self.final_norm = torch.nn.RMSNorm(d, eps=1e-6)
    self.head = torch.nn.Linear(d, vocab, bias=False)
    self.half = d // heads // 2

  def forward(self, tokens):
    t = tokens.shape[1]
    freqs = 10000.0 ** (-torch.arange(self.half, dtype=torch.float32) / self.half)
    angles = torch.arange(t, dtype=torch.float32)[:, None] * freqs[None]
    sin, cos = torch.sin(angles)[None, :, None], torch.cos(angles)[None, :, None]
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x, sin, cos)
    return self.head(self.final_norm(x))

  def load(self, params):
    p = jax.tree.map(lambda a: torch.from_numpy(np.array(a)), params['params'])
    with torch.no_grad():
      self.embed.weight.copy_(p['embed']['embedding'])
      self.final_norm.weight.copy_(p['final_norm']['scale'])
      self.head.weight.copy_(p['head']['kernel'].T)
      for i, block in enumerate(self.blocks):
        q = p[f'block_{i}']
        block.attn_norm.weight.copy_(q['attn_norm']['scale'])
        block.mlp_norm.weight.copy_(q['mlp_norm']['scale'])
        for name in ('query', 'key', 'value', 'out'):
          getattr(block, name).weight.copy_(q['attn'][name]['kernel'].T)
        for name in ('gate', 'up', 'down'):
          getattr(block, name).weight.copy_(q['mlp'][name]['kernel'].T)
    return self


class LogitsFirst(torch.nn.Module):
  """[batch, seq, vocab] logits as [batch, vocab, seq], the layout CrossEntropyLoss expects."""

  def __init__(self, lm):
    super().__init__()
    self.lm = lm

  def forward(self, tokens):
    return self.lm(tokens).transpose(1, 2)


# ---------------------------------------------------------------- problems

def mlp_problem(small: bool, batches: int):
  widths, d_in, classes, batch = ((64, 64), 32, 10, 32) if small else ((1024,) * 4, 1024, 10, 512)
  model = TanhMLP(widths, classes)
  params = model.init(jax.random.key(0), jnp.zeros((1, d_in)))
  rng = np.random.default_rng(0)
  data = [{'inputs': rng.standard_normal((batch, d_in), np.float32),
           'targets': rng.integers(0, classes, batch).astype(np.int32)} for _ in range(batches)]
  net = torch_mlp(params)
  return dict(apply=model.apply, params=params, data=data, torch_model=net, torch_loss_model=net,
              torch_params=[m.weight for m in net if isinstance(m, torch.nn.Linear)],
              terms=1, model_name='mlp')


def transformer_problem(small: bool, batches: int):
  cfg = (dict(vocab_size=64, d_model=32, num_layers=2, num_heads=2, mlp_dim=64), 16, 4) if small \
      else (dict(vocab_size=256, d_model=256, num_layers=4, num_heads=4, mlp_dim=1024), 128, 16)
  c, seq, batch = cfg
  model = TransformerLM(**c)
  params = model.init(jax.random.key(0), jnp.zeros((1, seq), jnp.int32))
  rng = np.random.default_rng(0)
  data = []
  for _ in range(batches):
    toks = rng.integers(0, c['vocab_size'], (batch, seq + 1)).astype(np.int32)
    data.append({'inputs': toks[:, :-1], 'targets': toks[:, 1:]})
  lm = TorchLM(c['vocab_size'], c['d_model'], c['num_layers'], c['num_heads'],
               c['mlp_dim']).load(params)
  return dict(apply=model.apply, params=params, data=data, torch_model=lm,
              torch_loss_model=LogitsFirst(lm),
              torch_params=[m.weight for m in lm.modules() if isinstance(m, torch.nn.Linear)],
              terms=seq, model_name='transformer')


# ---------------------------------------------------------------- contenders

def mean_ce(apply_fn):
  def loss(params, batch):
    logits = apply_fn(params, batch['inputs'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets']).mean()
  return loss


def lossland_factors(pb, fisher_type='true'):
  def run():
    return jax.block_until_ready(factors_lib.estimate_factors(
        pb['apply'], pb['params'], pb['data'], rng=jax.random.key(1), fisher_type=fisher_type))
  return run


def lossland_steady(pb, mesh):
  """The public call's compiled work alone: its accumulator over batches already on device."""
  params = jax.device_put(pb['params'], parallel.replicated(mesh))
  batches = [parallel.shard_batch(b, mesh) for b in pb['data']]
  parts = mesh.shape['data']
  views = capture.find_layers(pb['apply'], params, batches[0]['inputs'])
  acc = factors_lib.make_factor_accumulator(pb['apply'], list(views), mesh=mesh,
                                            per_device=parts > 1)
  sharding = (jax.sharding.NamedSharding(mesh, jax.P('data')) if parts > 1
              else parallel.replicated(mesh))

  def run():
    sums = jax.device_put(factors_lib.zero_sums(views, parts=parts), sharding)
    for i, batch in enumerate(batches):
      sums = dispatch.settle(acc(sums, params, batch, jax.random.fold_in(jax.random.key(1), i)))
    return jax.block_until_ready(sums)
  return run


def lossland_grad(pb, mesh):
  step = jax.jit(jax.value_and_grad(mean_ce(pb['apply'])))
  params = jax.device_put(pb['params'], parallel.replicated(mesh))

  def run():
    out = None
    for batch in pb['data']:
      out = dispatch.settle(step(params, parallel.shard_batch(batch, mesh)))
    return jax.block_until_ready(out)
  return run


def kfac_jax_factors(pb, mesh, mode='fisher_gradients'):
  apply_fn = pb['apply']

  def loss(params, batch):
    logits = apply_fn(params, batch['inputs'])
    kfac_jax.register_softmax_cross_entropy_loss(logits, batch['targets'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets']).mean()

  est = kfac_jax.BlockDiagonalCurvature(loss, default_estimation_mode=mode)
  params = jax.device_put(pb['params'], parallel.replicated(mesh))
  first = parallel.shard_batch(pb['data'][0], mesh)
  size = first['inputs'].shape[0]

  @jax.jit
  def update(state, batch, rng):
    return est.update_curvature_matrix_estimate(state, 1.0, 1.0, 0.0, size, rng, (params, batch),
                                                estimation_mode=mode)

  init = jax.jit(lambda rng: est.init(rng, (params, first), None, None))

  def run():
    state = init(jax.random.key(0))
    for i, batch in enumerate(pb['data']):
      state = dispatch.settle(update(state, parallel.shard_batch(batch, mesh),
                                     jax.random.fold_in(jax.random.key(1), i)))
    return jax.block_until_ready(state), est
  return run


def curvlinops_factors(pb, fisher=FisherType.MC):
  data = [(torch.from_numpy(b['inputs']).long() if pb['model_name'] == 'transformer'
           else torch.from_numpy(b['inputs']), torch.from_numpy(b['targets']).long())
          for b in pb['data']]
  n = sum(len(y) for _, y in data)

  def run():
    op = KFACLinearOperator(pb['torch_loss_model'], torch.nn.CrossEntropyLoss(), pb['torch_params'],
                            data, check_deterministic=False, fisher_type=fisher, mc_samples=1,
                            kfac_approx='expand', num_data=n,
                            num_per_example_loss_terms=pb['terms'])
    op.compute_kronecker_factors()
    return op
  return run


def torch_grad(pb):
  model = pb['torch_model']
  data = [(torch.from_numpy(b['inputs']).long(), torch.from_numpy(b['targets']).long())
          for b in pb['data']]

  def run():
    for x, y in data:
      model.zero_grad(set_to_none=True)
      logits = model(x)
      loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
      loss.backward()
    return loss.item()
  return run


# ---------------------------------------------------------------- agreement

def _normalized(m):
  m = np.asarray(m, np.float64)
  return m / np.trace(m)


def agreement(problem) -> dict:
  """Largest relative difference of trace-normalized factors, empirical Fisher, small model."""
  pb = problem(small=True, batches=2)
  mesh = parallel.data_mesh()
  ours = lossland_factors(pb, 'empirical')()  # {path: LayerFactors}, in call order
  state, est = kfac_jax_factors(pb, mesh, 'fisher_empirical')()
  paths = ['/'.join(str(k.key) for k in path[1:-1])  # ('params', ..., 'kernel') -> layer path
           for path, _ in jax.tree_util.tree_flatten_with_path(pb['params'])[0]]
  by_path = {}
  for indices, bstate in zip(est.jaxpr.layer_indices, state.blocks_states):
    if hasattr(bstate, 'factors'):  # Kronecker-factored (dense) blocks; RMSNorm scales are not
      by_path[paths[indices[0]]] = (bstate.factors[0].value, bstate.factors[1].value)
  theirs_kj = [by_path.get(name) for name in ours]
  names, ours = list(ours), [(f.A, f.G) for f in ours.values()]
  op = curvlinops_factors(pb, FisherType.EMPIRICAL)()
  theirs_cl = [(op._input_covariances[n], op._gradient_covariances[n]) for n in op._mapping]

  def diff(theirs):
    if len(theirs) != len(ours):
      return f'{len(theirs)} layers vs {len(ours)}'
    if any(t is None for t in theirs):
      return f'{sum(t is None for t in theirs)} layers without factors'
    worst = {}
    for name, (a, g), (ta, tg) in zip(names, ours, theirs):
      ta = np.asarray(ta)
      if ta.shape[0] == a.shape[0] + 1:  # kfac-jax: a bias adds the homogeneous coordinate
        ta = ta[:-1, :-1]
      for factor, x, y in (('A', a, ta), ('G', g, tg)):
        x, y = _normalized(x), _normalized(np.asarray(y))
        worst[f'{name}.{factor}'] = float(np.abs(x - y).max() / np.abs(x).max())
    far = {k: round(v, 4) for k, v in worst.items() if v > 1e-4}
    return {'max_other': max(v for k, v in worst.items() if k not in far), **far}

  return {'kfac_jax': diff(theirs_kj), 'curvlinops': diff(theirs_cl), 'layers': len(ours)}


def check_twins(pb) -> float:
  """Largest relative difference of the torch twin's outputs from the JAX model's."""
  x = pb['data'][0]['inputs']
  ours = np.asarray(pb['apply'](pb['params'], x))
  tx = torch.from_numpy(x).long() if pb['model_name'] == 'transformer' else torch.from_numpy(x)
  with torch.no_grad():
    theirs = pb['torch_model'](tx).numpy()
  return float(np.abs(ours - theirs).max() / np.abs(ours).max())


# ---------------------------------------------------------------- main

def main(args) -> None:
  torch.set_num_threads(side_by_side.threads())
  mesh = parallel.data_mesh()
  problems = {'mlp': mlp_problem, 'transformer': transformer_problem}
  chosen = list(problems) if args.model == 'both' else [args.model]
  for name in chosen:
    problem = problems[name]
    batches = args.batches or {'mlp': 20, 'transformer': 10}[name]
    extra = {'devices': jax.device_count(), 'batches': batches,
             'torch_threads': torch.get_num_threads(), 'fisher': 'MC, 1 sample, expand'}
    if not args.no_check:
      extra['agreement_empirical_small'] = agreement(problem)
      print(f'{name}: factor agreement (small model, empirical Fisher, trace-normalized): '
            f'{extra["agreement_empirical_small"]}', flush=True)
    pb = problem(small=False, batches=batches)
    extra['twin_max_rel_logit_diff'] = check_twins(pb)
    load_before = round(os.getloadavg()[0], 2)
    contenders = {'lossland': lossland_factors(pb), 'lossland_steady': lossland_steady(pb, mesh),
                  'lossland_grad': lossland_grad(pb, mesh),
                  'kfac_jax': kfac_jax_factors(pb, mesh), 'curvlinops': curvlinops_factors(pb)}
    if name == 'transformer':
      contenders['torch_grad'] = torch_grad(pb)
    times = side_by_side.alternate(contenders, rounds=args.rounds)
    side_by_side.report(f'kfac_factors_{name}', times, load_before=load_before, **extra)
    if name == 'transformer':
      grads = {k: times[k] for k in ('lossland_grad', 'torch_grad')}
      side_by_side.report('grad_step_transformer', grads, ours='lossland_grad')


if __name__ == '__main__':
  main(ARGS)
