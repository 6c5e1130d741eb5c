"""GaLore as an optax transformation, against optax's Adam and a numpy reference of Alg. 1."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lossland import lowrank


def _grads(step, shapes):
  keys = jax.random.split(jax.random.key(step), len(shapes))
  return {name: jax.random.normal(k, shape) for k, (name, shape) in zip(keys, shapes.items())}


def _reference(grads, projectors, scale, b1=0.9, b2=0.999, eps=1e-8):
  """Numpy GaLore-Adam for one matrix (Zhao et al. 2024, Alg. 1), float64, given the projectors.

  SVD vectors are defined only up to sign, and LAPACK builds choose signs
  differently; since moments are carried across refreshes, the update depends
  on those signs. The reference therefore takes lossland's own projectors, and
  the test checks separately that each spans the top singular subspace.
  """
  mu = nu = None
  out = []
  for t, (g, p) in enumerate(zip(grads, projectors), start=1):
    g, p = np.asarray(g, np.float64), np.asarray(p, np.float64)
    right = g.shape[0] >= g.shape[1]
    r = g @ p if right else p.T @ g
    mu = (1 - b1) * r if mu is None else b1 * mu + (1 - b1) * r
    nu = (1 - b2) * r * r if nu is None else b2 * nu + (1 - b2) * r * r
    n = (mu / (1 - b1 ** t)) / (np.sqrt(nu / (1 - b2 ** t)) + eps)
    out.append(scale * (n @ p.T if right else p @ n))
  return out


def _top_subspace(g, rank):
  """Orthogonal projector onto the top-`rank` right (tall) or left (wide) singular vectors."""
  u, _, vt = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
  basis = vt[:rank].T if g.shape[0] >= g.shape[1] else u[:, :rank]
  return basis @ basis.T


def test_galore_matches_reference_and_adam_elsewhere():
  shapes = {'tall': (12, 6), 'wide': (5, 10), 'bias': (6,), 'small': (2, 3)}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  tx = lowrank.scale_by_galore(2, update_proj_gap=2, scale=0.25)
  adam = optax.scale_by_adam()
  state, adam_state = tx.init(params), adam.init(params)
  assert state.mu['tall'].shape == (12, 2) and state.mu['wide'].shape == (2, 10)
  assert state.mu['small'].shape == (2, 3)  # min dim 2 is not above the rank: plain Adam
  grads = [_grads(s, shapes) for s in range(5)]
  update = jax.jit(tx.update)
  outs, used = [], []
  for g in grads:
    u, state = update(g, state, params)
    ua, adam_state = adam.update(g, adam_state, params)
    for name in ('bias', 'small'):
      np.testing.assert_allclose(u[name], ua[name], rtol=1e-5, atol=1e-6)
    outs.append(u)
    used.append(state.projectors)
  projectors = [p['tall'] for p in used]
  for name in ('tall', 'wide'):
    for step in (0, 2, 4):  # the refreshes: the top-2 singular subspace of that step's gradient
      p = np.asarray(used[step][name], np.float64)
      # float32 SVD of a 12 x 6 Gaussian matrix: subspace error ~ eps / singular gap.
      np.testing.assert_allclose(p @ p.T, _top_subspace(grads[step][name], 2), atol=1e-4)
    ref = _reference([g[name] for g in grads], [p[name] for p in used], 0.25)
    for got, want in zip(outs, ref):
      np.testing.assert_allclose(got[name], want, rtol=2e-3, atol=2e-4)
  # refreshed at steps 0, 2, 4 only
  np.testing.assert_array_equal(projectors[0], projectors[1])
  assert not np.allclose(projectors[1], projectors[2])
  np.testing.assert_array_equal(projectors[2], projectors[3])


def test_galore_adamw_trains_and_stores_less_state():
  target = jax.random.normal(jax.random.key(0), (32, 16))
  params = {'w': jnp.zeros((32, 16)), 'b': jnp.zeros((16,))}
  loss = lambda p: jnp.mean((p['w'] + p['b'] - target) ** 2)
  tx = lowrank.galore_adamw(0.05, rank=4, update_proj_gap=10, scale=1.0, grad_clip=None)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  start = float(loss(params))
  for _ in range(60):
    params, state = step(params, state)
  assert float(loss(params)) < 0.5 * start
  galore_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  adam_bytes = sum(x.nbytes for x in jax.tree.leaves(optax.adamw(0.1).init(params)))
  assert galore_bytes < 0.6 * adam_bytes


def _algorithm_1_first_step(g, rank, scale, b1=0.9, b2=0.999, eps=1e-8):
  """Alg. 1's first update, float64: project the smaller side of G on its top-r singular vectors.

  Alg. 1 takes W ∈ R^{m×n} with m ≤ n, P = U[:, :r] and moments of shape [r, n];
  for m > n it is the same algorithm on Gᵀ. The first update does not depend on
  the SVD's signs (flipping a singular vector flips R and its back-projection).
  """
  g = np.asarray(g, np.float64)
  flip = g.shape[0] > g.shape[1]
  g = g.T if flip else g
  u, _, _ = np.linalg.svd(g, full_matrices=False)
  p = u[:, :rank]  # [m, r], m = min side
  r = p.T @ g  # [r, n], n = max side
  mu, nu = (1 - b1) * r / (1 - b1), (1 - b2) * r * r / (1 - b2)
  update = scale * p @ (mu / (np.sqrt(nu) + eps))
  return (update.T if flip else update), r.shape


def test_optax_contrib_galore_projects_the_other_side_than_algorithm_1():
  """Why lossland keeps its own GaLore: optax.contrib.scale_by_galore (optax 0.2.8) projects the
  larger side of a non-square gradient (left projector U[:, :r] when m >= n), keeping moments of
  shape [r, min(m, n)]; Alg. 1 (and the reference code) projects the smaller side, with moments
  [max(m, n), r]. With Adam's elementwise normalization the updates differ."""
  shapes = {'tall': (12, 6), 'wide': (5, 10)}
  grads = _grads(7, shapes)
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  ours = lowrank.scale_by_galore(2, update_proj_gap=2, scale=0.25)
  theirs = optax.contrib.scale_by_galore(rank=2, update_proj_gap=2, scale=0.25)
  ours_u, ours_state = ours.update(grads, ours.init(params), params)
  theirs_state = theirs.init(params)
  theirs_u, _ = theirs.update(grads, theirs_state, params)
  theirs_mu = theirs_state.base_optimizer_state.mu
  for name in shapes:
    want, moment_shape = _algorithm_1_first_step(grads[name], 2, 0.25)
    assert sorted(ours_state.mu[name].shape) == sorted(moment_shape) == [2, max(shapes[name])]
    assert sorted(theirs_mu[name].shape) == [2, min(shapes[name])]
    # Entries ~0.25 * O(1): float32 rounding of the SVD and Adam's division is far below 1e-3.
    np.testing.assert_allclose(ours_u[name], want, atol=1e-3)
    assert np.linalg.norm(theirs_u[name] - want) > 0.3 * np.linalg.norm(want), name
