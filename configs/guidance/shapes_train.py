"""Train the text-conditioned UNet of `lossland.guidance` on the embedded `shapes32` data.

    python -m launch.analyze --config=configs/guidance/shapes_train.py --workdir=DIR

DDPM ε-prediction (linear β, T = 1000), 10% caption dropout, AdamW, EMA of the
params; a ~1M-parameter UNet (channels 32/64/64, cross-attention at 16x16 and
8x8, a 2-layer causal text encoder of width 64). Trains for `num_steps` or
`time_budget_s` seconds, whichever comes first, and writes
`DIR/params.msgpack` + `DIR/model.json`. The committed checkpoints were made
with this config (each folder's `README.md` has the exact command and cost):
`lossland/guidance/assets/shapes_unet/` (defaults: 20k steps, composes
two-object prompts well) and `lossland/guidance/assets/shapes_unet_3k/`
(`:3k`, the model the evaluation uses: it neglects). `:runlocal` trains 20 steps of a
tiny UNet on 256 generated scenes. Measured costs and losses: `docs/results/guidance.md`.
"""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.experiment = 'guidance_train'
  c.seed = 0
  c.progress = True
  # source: 'shapes32' (the TFDS builder, built on first use) or 'generate' (the same renderer
  # without TFDS, `train.num_examples` scenes with `two_object_fraction` of them two-object;
  # the builder's fraction is fixed at shapes.TWO_OBJECT_FRACTION = 0.3)
  c.data = ml_collections.ConfigDict(dict(source='shapes32', data_dir='',
                                          two_object_fraction=0.3))
  c.model = ml_collections.ConfigDict(dict(
      channels=(32, 64, 64), attention_resolutions=(16, 8), text_width=64, text_layers=2,
      text_heads=4, num_heads=4))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=256, num_steps=200_000, time_budget_s=210.0, learning_rate=5e-4, final_lr=1e-4,
      warmup_steps=500, weight_decay=0.0, grad_clip=1.0, steps_per_block=100, ema_decay=0.999,
      caption_dropout=0.1, num_timesteps=1000, num_examples=0))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  if arg == '3k':
    # The committed `shapes_unet_3k` checkpoint: 3,000 steps (cosine lr) on 30,000 rendered
    # scenes, 30% of them two-object.
    c.data.source = 'generate'
    c.train.update(num_steps=3000, time_budget_s=0.0, num_examples=30000)
  elif arg == 'runlocal':
    c.data.source = 'generate'
    c.model.channels = (8, 16, 16)
    c.model.text_width = 16
    c.train.update(batch_size=8, num_steps=20, time_budget_s=0.0, warmup_steps=5,
                   steps_per_block=10, num_examples=256, ema_decay=0.9)
  elif arg:
    raise ValueError(f'unknown config arg {arg!r}; use 3k, runlocal or nothing')
  return c
