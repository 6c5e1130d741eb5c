"""`launch.compile`: AOT compilation for a TPU topology on this CPU-only machine (libtpu).

Compiles tiny programs for `v5e:2x2` (4 abstract TPU v5e chips) and checks
the reported bytes and FLOPs against what the shapes imply, the K-FAC/fwd+bwd
FLOPs ratio, `--find_smallest`, and one clear error for each bad input.
"""
from __future__ import annotations

import json
import re

import pytest

from launch import compile as compile_lib

pytestmark = pytest.mark.skipif(
    not compile_lib.libtpu_available(),
    reason='libtpu is not installed (pip install -e ".[tpu]"): it is the TPU compiler these '
           'tests compile with')

from configs.compile import _base  # noqa: E402


def tiny(**kwargs):
  settings = dict(d_model=64, num_layers=2, num_heads=2, mlp_dim=128, vocab_size=256,
                  batch_size=8, seq_len=32, programs='train,fwd_bwd,kfac', fsdp=False)
  settings.update(kwargs)
  return _base.lm_config(**settings)


def test_tiny_lm_bytes_flops_and_kfac_ratio(tmp_path, capsys):
  report = compile_lib.run(['--config=configs/compile/llama_1b_dense.py', '--topology=v5e:2x2',
                            f'--workdir={tmp_path}', '--programs=train,fwd_bwd,kfac',
                            '--config.model.d_model=64', '--config.model.num_layers=2',
                            '--config.model.num_heads=2', '--config.model.mlp_dim=128',
                            '--config.compile.vocab_size=256', '--config.train.batch_size=8',
                            '--config.kfac.batch_size=8', '--config.train.seq_len=32',
                            '--config.compile.fsdp=false'])
  assert json.loads((tmp_path / 'compile.json').read_text())['programs'].keys() == {
      'train', 'fwd_bwd', 'kfac'}
  assert 'K-FAC accumulation / forward+backward FLOPs' in capsys.readouterr().out
  assert (report['chip'], report['devices'], report['mesh']) == ('TPU v5 lite', 4,
                                                                 {'data': 4, 'model': 1})
  d, layers, mlp, vocab, seq = 64, 2, 128, 256, 32
  n = report['param_count']
  assert n == vocab * d * 2 + layers * (4 * d * d + 3 * d * mlp + 2 * d) + d
  fb, step = report['programs']['fwd_bwd'], report['programs']['train']
  # Replicated float32 params (4 bytes each) are the bulk of the arguments, plus this chip's
  # 2 rows of int32 inputs and targets and the rng key. TPU layouts pad the minor dimension
  # of an array to 128 lanes, so a 64-wide matrix takes up to twice its bytes.
  assert 4 * n + 2 * 2 * seq * 4 <= fb['argument_bytes'] <= 2 * (4 * n + 2 * 2 * seq * 4) + 64
  # The train step donates its state: params and two AdamW moments come back aliased.
  assert step['alias_bytes'] >= 3 * 4 * n
  assert step['total_bytes'] == (step['argument_bytes'] + step['output_bytes']
                                 - step['alias_bytes'] + step['temp_bytes']
                                 + step['generated_code_bytes'])
  # Forward + backward is 3x the forward's 2 FLOPs per weight and token on this chip's 2 x 32
  # tokens (matmul weights: every block's linear maps and the head), plus the attention
  # products (QK^T and PV: 2 x 2 seq d FLOPs per token, x3). The rest (norms, softmax,
  # optimizer) is elementwise: well under 10% here.
  tokens = 2 * seq
  matmul_weights = layers * (4 * d * d + 3 * d * mlp) + d * vocab
  expected = 6 * matmul_weights * tokens + 3 * layers * 4 * seq * d * tokens
  assert expected <= fb['flops_per_device'] <= 1.1 * expected
  assert step['flops_per_device'] >= fb['flops_per_device']
  # K-FAC: the forward, the backward to the layer outputs (activation gradients only: no
  # weight gradients, so at least the matmuls' 2 FLOPs per weight and token) and the factor
  # outer products (2 d^2 + 2 mlp^2 per token for each gate/up layer). It needs more than
  # forward + activation backward of the matmuls, and less than fwd+bwd plus the products.
  outer = layers * 2 * (2 * d * d + 2 * mlp * mlp) * tokens
  ratio = report['kfac_over_fwd_bwd_flops']
  kfac_flops = report['programs']['kfac']['flops_per_device']
  assert ratio == pytest.approx(kfac_flops / fb['flops_per_device'])
  assert 4 * matmul_weights * tokens < kfac_flops < fb['flops_per_device'] + outer
  assert report['programs']['kfac']['batch_size'] == 8


def test_find_smallest_skips_the_topology_that_does_not_fit():
  # A 2-layer model with a 2^22 x 1024 tied embedding: 4.3 G float32 params, 16 GiB; with
  # two AdamW moments and the gradient 64 GiB, sharded FSDP over the chips: 16 GiB + the
  # activations on 4 chips (more than v5e's 16 GiB), about 8 GiB on 8.
  config = tiny(d_model=1024, num_layers=1, num_heads=8, mlp_dim=1024, vocab_size=2 ** 22,
                batch_size=8, seq_len=8, programs='train', fsdp=True, tie_embeddings=True)
  lines = []
  report = compile_lib.find_smallest(config, 'v5e', ['train'], log=lines.append)
  assert report['topology'] == 'v5e:2x4' and report['tried_before'] == ['v5e:2x2']
  assert len(lines) == 1 and lines[0].startswith('v5e:2x2: does not fit v5e:2x2 (TPU v5 lite, '
                                                 '17,179,869,184 bytes = 16 GiB')
  assert 'train' in lines[0]
  total = report['programs']['train']['total_bytes']
  assert 64 * 2 ** 30 / 8 < total < 16 * 2 ** 30


@pytest.mark.parametrize('argv,needle', [
    (['--topology=v9x:2x2'], "unknown topology 'v9x:2x2'; give <chip>:<shape>"),
    (['--topology=v5e:3x3'], "libtpu does not know topology 'v5e:3x3'"),
    (['--topology=v5e:2x2', '--config.mesh.data=8'],
     r"config mesh \{'data': 8, 'model': 1\} .* does not match the topology's 4 devices"),
    (['--topology=v5e:2x2', '--programs=train,backprop'], r"unknown program\(s\) \['backprop'\]"),
    ([], 'give exactly one of --topology'),
])
def test_bad_input_gives_one_clear_error(argv, needle):
  with pytest.raises(compile_lib.CompileError, match=needle):
    compile_lib.run(['--config=configs/lm/pydoc_byte.py', *argv])


def test_unknown_eigh_method_is_refused_before_compiling():
  with pytest.raises(compile_lib.CompileError,
                     match=r"--config.kfac.eigh: eigh method 'lapack' is not one of"):
    compile_lib.run(['--config=configs/compile/olmo2_7b_kfac.py:small', '--topology=v5e:2x2',
                     '--config.kfac.eigh=lapack'])


def test_eigh_method_reaches_the_tpu_program():
  # A 512-wide factor: above jax's 256 threshold, TPU's default eigh is QDWH (expanded into
  # loops, no Eigh call); 'jacobi' lowers to libtpu's Eigh kernel. Lowering only: compiling
  # QDWH takes minutes (docs/results/pod_compile.md).
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from lossland import parallel
  from lossland.curvature import factors

  mesh = parallel.make_mesh({'data': 4}, compile_lib.topology_devices('v5e:2x2'))
  spec = P('data', None, None)

  def abstract(*shape):
    s = P(*spec[:len(shape)])
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, s))

  sums = factors.FactorSums(abstract(4, 64, 64), abstract(4, 512, 512), abstract(4))
  texts = {}
  for method in ('auto', 'jacobi'):
    fn = jax.jit(lambda s, w, m=method: compile_lib.layer_parallel_eig_edit(
        s, w, 0.6, mesh, spec, eigh_method=m))
    texts[method] = fn.lower(sums, abstract(4, 64, 512)).as_text()
  eigh_512 = lambda text: re.search(r'@Eigh\(%\d+\) \{[^}]*\} : \(tensor<512x512xf32>\)',  # noqa: E731
                                   text)
  # jacobi: the 512² factor in one libtpu Eigh call. auto: QDWH divides the spectrum with
  # matmuls and loops down to 256-wide blocks (Eigh calls of 256², none of 512²), a program
  # more than ten times longer.
  assert eigh_512(texts['jacobi']) and not eigh_512(texts['auto'])
  assert 'tensor<256x256xf32>, tensor<256xf32>' in texts['auto']
  assert len(texts['auto']) > 10 * len(texts['jacobi'])


def test_vocabulary_from_data_needs_its_size():
  with pytest.raises(compile_lib.CompileError, match='--vocab_size=N'):
    compile_lib.run(['--config=configs/lm/shakespeare_char.py', '--topology=v5e:2x2'])


def test_main_prints_the_error_and_exits_1(capsys):
  with pytest.raises(SystemExit) as exit_info:
    compile_lib.main(['--config=configs/lm/pydoc_byte.py', '--topology=v5e:7x7'])
  assert exit_info.value.code == 1
  assert capsys.readouterr().err.startswith("error: libtpu does not know topology 'v5e:7x7'")


def test_layer_parallel_eig_edit_equals_the_library_edit():
  # The eig_edit program's per-shard loop (shard_map over the layer axis, lax.map over the
  # layers a shard holds) on 8 CPU devices (data 4 x model 2, 2 layers per data shard)
  # against the library: eigen.layer_eigenbasis of the mean factors, edit.curvature_masks
  # and edit.apply_mask, layer by layer on one device.
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from lossland import parallel
  from lossland.curvature import edit, eigen, factors

  layers, d_in, d_out, rho = 8, 6, 10, 0.6
  rng = np.random.default_rng(0)

  def gram(d):  # sums of outer products of 20 samples: PSD, distinct eigenvalues
    x = rng.normal(size=(layers, 20, d)).astype(np.float32)
    return np.einsum('lni,lnj->lij', x, x)

  a, g = gram(d_in), gram(d_out)
  count = np.array([20, 20, 5, 1, 20, 0, 7, 20], np.float32)  # 0: the program divides by 1
  w = rng.normal(size=(layers, d_in, d_out)).astype(np.float32)
  mesh = parallel.make_mesh({'data': 4, 'model': 2}, jax.devices()[:8])
  spec = P('data', None, None)
  put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
  sums = factors.FactorSums(put(a, spec), put(g, spec), put(count, P('data')))
  got = jax.jit(lambda s, w: compile_lib.layer_parallel_eig_edit(s, w, rho, mesh, spec))(
      sums, put(w, spec))
  got = np.asarray(parallel.settle(got))
  for i in range(layers):
    n = max(count[i], 1.0)
    ua, lam, ug, mu = eigen.layer_eigenbasis(jnp.asarray(a[i] / n), jnp.asarray(g[i] / n))
    basis = eigen.LayerBasis(ua, lam, ug, mu, view=None)
    mask = edit.curvature_masks({'layer': basis}, rho)['layer']
    assert 0 < int(mask.sum()) < d_in * d_out  # the edit removes some pairs, not all
    want = np.asarray(edit.apply_mask(jnp.asarray(w[i]), ua, ug, mask))
    # Same float32 eigh and HIGHEST-precision products on the same backend; only the
    # order of the reductions inside the batched (lax.map) program may differ.
    np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-5 * np.abs(w[i]).max())
    assert not np.allclose(got[i], w[i], atol=1e-3)


def test_eigh_compile_cost_reports_one_line_per_size_and_method(capsys):
  from launch import eigh_compile_cost
  eigh_compile_cost.main(['--sizes=64', '--methods=auto,jacobi'])
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(r['n'], r['method']) for r in lines] == [(64, 'auto'), (64, 'jacobi')]
  for r in lines:
    assert 'failed' not in r and r['compile_seconds'] > 0 and r['maxrss_bytes'] > 2 ** 20
    assert r['temp_bytes'] >= 0 and r['generated_code_bytes'] > 0
  with pytest.raises(SystemExit, match="eigh method 'lapack' is not one of"):
    eigh_compile_cost.main(['--methods=lapack'])
