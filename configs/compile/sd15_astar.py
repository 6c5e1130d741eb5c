"""Stable Diffusion 1.5 at 512x512 with A-STAR: one chip's memory and its largest seed batch.

    python -m launch.compile --config=configs/compile/sd15_astar.py --topology=v5e:2x2
    python -m launch.compile --config=configs/compile/sd15_astar.py --topology=v5e:2x2 \
        --config.sd.arm=attend_excite --config.sd.path=/ckpts/stable-diffusion-v1-5

The architecture is SD 1.5's published diffusers configs (UNet 860M, CLIP
ViT-L/14 text encoder 123M, PNDM with 50 steps = 51 UNet calls), written out
here so nothing is read; `sd.path` takes them from a local folder instead.
Params are replicated on every chip (bfloat16, 1.96 GB) and the seed batch is
sharded over `data` (all chips). `launch.compile_sd` explains the search;
each batch size compiles in its own process (`isolate_compiles`), since libtpu's
compiler crashed on one of them.
"""
import ml_collections

SD15_UNET = dict(
    _class_name='UNet2DConditionModel', act_fn='silu', attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                      'DownBlock2D'],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D',
                    'CrossAttnUpBlock2D'])
SD15_TEXT = dict(
    architectures=['CLIPTextModel'], model_type='clip_text_model', hidden_act='quick_gelu',
    hidden_size=768, intermediate_size=3072, layer_norm_eps=1e-05, max_position_embeddings=77,
    num_attention_heads=12, num_hidden_layers=12, vocab_size=49408)
SD15_SCHEDULER = dict(
    _class_name='PNDMScheduler', beta_end=0.012, beta_schedule='scaled_linear',
    beta_start=0.00085, num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
    steps_offset=1, trained_betas=None)


def get_config(arg=None):
  if arg is not None:
    raise ValueError(f'unknown config arg {arg!r}; this config takes none')
  c = ml_collections.ConfigDict()
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  c.compile = ml_collections.ConfigDict(dict(programs='sd_sample'))
  c.sd = ml_collections.ConfigDict(dict(
      path='', unet=SD15_UNET, text_encoder=SD15_TEXT, scheduler=SD15_SCHEDULER, arm='astar',
      num_steps=50, latent_size=64, dtype='bfloat16', param_dtype='bfloat16', batch_per_chip=1,
      max_batch_per_chip=64, isolate_compiles=True))
  return c
