"""The evaluation's sampling loop: many guided batches in a row on 8 fake CPU devices.

With a batch sharded over the devices, the guided sampler's refinement loop
reduces over the batch (`all(done)`), so each call carries collectives; many
calls in flight at once deadlock XLA:CPU (see tests/test_dispatch.py). The
runner settles each call; the test checks it finishes and that every chunk gives
the images a single call gives for the same prompts and seeds.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland import guidance as G
from lossland import parallel
from lossland.data import shapes
from lossland.models import TextUNet

NUM_CHUNKS = 48


@pytest.mark.slow  # ~35 s of CPU on 2 cores, mostly compiling the guided sampler
def test_many_guided_chunks_in_a_row():
  model = TextUNet(vocab_size=len(shapes.VOCAB), channels=(8, 8), attention_resolutions=(16,),
                   text_width=8, num_heads=1, text_heads=1)
  shapes_ = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                           jnp.zeros((1,)), jnp.zeros((1, shapes.MAX_TOKENS), jnp.int32))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32), shapes_)
  mesh = parallel.make_mesh({'data': 8}, jax.devices())
  runner = G.runner.Runner(model.apply, params, schedule=G.linear_schedule(1000), num_steps=2,
                           batch_size=8, mesh=mesh)
  guide = G.Guidance('astar', num_guided_steps=1, resolution=16, refine_steps=(0,),
                     refine_targets=(0.0,), max_refine_iters=2)
  prompts = [(('red', 'circle'), ('blue', 'square'))] * 8
  seeds = list(range(8 * NUM_CHUNKS))
  images = runner.run(prompts * NUM_CHUNKS, seeds, [['circle', 'square']] * len(seeds),
                      guide=guide, cfg=3.0, scale=1.0).images
  assert images.shape == (8 * NUM_CHUNKS, 32, 32, 3)
  # Chunks differ only by their seeds: rerunning one chunk alone gives the same images.
  last = runner.run(prompts, seeds[-8:], [['circle', 'square']] * 8, guide=guide, cfg=3.0,
                    scale=1.0).images
  np.testing.assert_array_equal(last, images[-8:])
