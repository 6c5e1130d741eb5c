"""Stable Diffusion sampling on CPU: lossland's sampler vs diffusers' pipelines, same work.

    pip install -e . -r benchmarks/requirements.txt   # peers: torch (CPU wheel), diffusers
    python -m benchmarks.sd_vs_diffusers                          # both devices counts, 2 cores
    taskset -c 0 python -m benchmarks.sd_vs_diffusers --devices 1 # 1 core, 1 device
    python -m benchmarks.sd_vs_diffusers --folder /path/to/stable-diffusion-v1-5 --rounds 3
    python -m benchmarks.sd_vs_diffusers --profile --devices 1   # where one UNet call's time goes

One local diffusers folder (the tiny random SD 1.x fixture tests/fixtures/sd/tiny_sd1
by default; any SD 1.x/2.x folder), loaded by both libraries; the same 4 prompts,
the same initial latents z_T (`lossland.guidance.sd.initial_latents` of seeds 0..3,
NHWC for lossland, NCHW for diffusers), DDIM (diffusers' `DDIMScheduler` built
from the folder's scheduler config with clip_sample=False, the same config given
to lossland's `schedulers.scheduler_from_config`), 10 steps, CFG 7.5, latents out
(no VAE decoding on either side: `output_type='latent'`, `decode=False`).

Two comparisons, each timed with `side_by_side.alternate` (one warm-up call per
contender, compiles included there and excluded from the rounds) and printed by
`side_by_side.report`:

* unguided: `make_sd_sampler(sd, 'baseline')` vs `StableDiffusionPipeline`;
* Attend-and-Excite: `make_sd_sampler(sd, 'attend_excite', num_guided_steps=K,
  refine_steps=..., refine_targets=1 - thresholds)` with `step_scale` = scale_factor vs
  `StableDiffusionAttendAndExcitePipeline(max_iter_to_alter=K, thresholds=...,
  scale_factor=...)` with the same token indices (attn_res 16x16). Default: the
  arm's defaults (`sd.arm_guidance('attend_excite', N)`, A&E's paper settings):
  K = N/2 (its 25 of 50), thresholds {0: 0.05, 10: 0.5, 20: 0.8}, scale 20; with
  N = 10 only step 0 is a refinement step. `--ae-fixture` uses the settings of
  tests/fixtures/sd/tiny_sd1/pipeline_reference.npz instead (K = 4, thresholds
  {0: 0.5, 2: 0.6}), under which the tiny random UNet refines up to 20 times at
  steps 0 and 2: diffusers then takes minutes per call.

`--devices N` sets `XLA_FLAGS=--xla_force_host_platform_device_count=N` before
jax is imported: lossland shards the batch over N emulated CPU devices
('lossland'), and with N > 1 also runs on one of them ('lossland_1dev'), in the
same rounds. PyTorch uses all the cores the process may use (`side_by_side.threads`);
restrict both with `taskset`. The max abs difference of the final latents
(lossland vs diffusers) is printed for each comparison: the same work, to float32
rounding (tests/guidance/test_sd_sampling.py asserts it on the fixture). With the
tiny folder the whole run took 99 s on 1 core (`taskset -c 0`); on 2 cores shared
with other tenants (load average 3-6) PyTorch's two threads slowed to 4-30 s per
call (1.5 s on one thread) and the run took 7 minutes: compare 2-core numbers only
from an idle machine.

`--profile` instead times one UNet call on the CFG batch [2b] in each library and
lists where it goes: lossland's XLA thunks from a `jax.profiler` trace read as
JSON (by kind, and the top instructions with the layer each comes from) and
diffusers' torch operators from `torch.profiler` (self time). Thunk times are
summed over threads and include time shared with concurrent thunks.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
PROMPTS = ('a cat and a dog', 'a red ball on a blue bench')
CONCEPTS = (('cat', 'dog'), ('ball', 'bench'))
FIXTURE_AE = dict(max_iter_to_alter=4, thresholds={0: 0.5, 2: 0.6}, scale_factor=20.0)


def _args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--folder', default=str(REPO / 'tests' / 'fixtures' / 'sd' / 'tiny_sd1'))
  p.add_argument('--devices', type=int, default=2, help='emulated XLA CPU devices')
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--cfg', type=float, default=7.5)
  p.add_argument('--only', choices=('unguided', 'attend_excite'), default=None)
  p.add_argument('--ae-fixture', action='store_true',
                 help="the A&E settings of the test fixture instead of the arm's defaults")
  p.add_argument('--profile', action='store_true',
                 help='profile one UNet call (the CFG batch) in both libraries instead')
  return p.parse_args(argv)


def _kind(name: str) -> str:
  return re.sub(r'[._]\d+$', '', name)


def profile(model, pipe, context, args) -> None:
  """Where one UNet call on the CFG batch [2b] spends its time: XLA thunks vs torch operators."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from torch.profiler import ProfilerActivity, profile as torch_profile  # pylint: disable=g-import-not-at-top

  n, calls = 2 * args.batch, 10
  x = np.random.default_rng(0).standard_normal(
      (n, model.latent_size, model.latent_size, model.latent_channels)).astype(np.float32)
  t = jnp.full((n,), 500, jnp.int32)
  unet = jax.jit(model.apply_unet)
  ctx = jnp.asarray(context)
  compiled = unet.lower(model.params, x, t, ctx).compile()
  # which layer each HLO instruction comes from (its op_name metadata)
  where = dict(re.findall(r'%(\S+) = .*?op_name="([^"]+)"', compiled.as_text()))
  x = jnp.asarray(x)
  jax.block_until_ready(unet(model.params, x, t, ctx))
  start = time.perf_counter()
  for _ in range(calls):
    out = unet(model.params, x, t, ctx)
  jax.block_until_ready(out)
  jax_ms = (time.perf_counter() - start) / calls * 1e3
  trace_dir = tempfile.mkdtemp()
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  for _ in range(calls):
    out = unet(model.params, x, t, ctx)
  jax.block_until_ready(out)
  jax.profiler.stop_trace()
  path = sorted(glob.glob(f'{trace_dir}/**/*.trace.json.gz', recursive=True))[-1]
  events = json.load(gzip.open(path))
  events = events['traceEvents'] if isinstance(events, dict) else events
  kinds, ops, counts = collections.Counter(), collections.Counter(), collections.Counter()
  skip = ('ThunkExecutor', '$', 'Wait', 'Rendezvous', 'end: ', 'PjitFunction', 'Slinky', 'Mutex',
          'Common', 'Parse', 'Handle', 'Alloc', 'Python')
  for e in events:
    name = e.get('name', '')
    if e.get('ph') == 'X' and not name.startswith(skip):
      kinds[_kind(name)] += e.get('dur', 0)
      ops[name] += e.get('dur', 0)
      counts[_kind(name)] += 1
  print(f'\nlossland UNet, batch {n}: {jax_ms:.1f} ms per call (wall, {calls} calls); XLA thunks '
        'in ms per call, summed over threads ("while" holds the blocked self-attention\'s '
        'thunks, also listed inside it):')
  for kind, us in kinds.most_common(12):
    print(f'  {us / 1e3 / calls:8.2f}  {counts[kind] / calls:6.1f} calls  {kind}')
  # by the operation each thunk comes from (the last part of its op_name): convolutions,
  # attention products, norms; and by layer kind (attn1 = self-, attn2 = cross-attention)
  ops_of, layers_of = collections.Counter(), collections.Counter()
  for name, us in ops.items():
    op_name = where.get(name, '')
    if not op_name or _kind(name) == 'while':
      continue
    ops_of[op_name.rsplit('/', 1)[-1]] += us
    layer = re.findall(r'/(attn1|attn2|ff|norm\d?|conv\w*|resnets_\d+|proj_\w+|time_\w+)(?=/)',
                       op_name.rsplit('/', 1)[0] + '/')
    layers_of[layer[-1] if layer else 'other'] += us
  print('  by operation:      ' + ', '.join(f'{k} {us / 1e3 / calls:.1f}'
                                           for k, us in ops_of.most_common(8)))
  print('  by innermost layer: ' + ', '.join(f'{k} {us / 1e3 / calls:.1f}'
                                            for k, us in layers_of.most_common(10)))
  print('  top instructions:')
  for name, us in ops.most_common(12):
    print(f'  {us / 1e3 / calls:8.2f}  {name:28s} {where.get(name, "")[-90:]}')

  tx = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy())
  tctx = torch.tensor(np.asarray(context))
  with torch.inference_mode():
    pipe.unet(tx, 500, encoder_hidden_states=tctx)
    start = time.perf_counter()
    for _ in range(calls):
      pipe.unet(tx, 500, encoder_hidden_states=tctx)
    torch_ms = (time.perf_counter() - start) / calls * 1e3
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
      for _ in range(calls):
        pipe.unet(tx, 500, encoder_hidden_states=tctx)
  print(f'\ndiffusers UNet, batch {n}: {torch_ms:.1f} ms per call (wall, {calls} calls, '
        f'{torch.get_num_threads()} threads); torch operators, self time in ms per call:')
  rows = sorted(prof.key_averages(), key=lambda r: r.self_cpu_time_total, reverse=True)[:12]
  for r in rows:
    print(f'  {r.self_cpu_time_total / 1e3 / calls:8.2f}  {r.count / calls:6.1f} calls  {r.key}')


def main(argv=None) -> None:
  args = _args(sys.argv[1:] if argv is None else argv)
  flags = os.environ.get('XLA_FLAGS', '')
  flags += f' --xla_force_host_platform_device_count={args.devices}'
  if args.profile:
    flags += ' --xla_cpu_enable_xprof_traceme=true'  # per-thunk events in the trace
  os.environ['XLA_FLAGS'] = flags.strip()
  # torchvision is no dependency of either pipeline, but transformers imports it when it is
  # installed, and a torchvision built for another torch (e.g. pulled in by backpack-for-pytorch)
  # fails to import ("operator torchvision::nms does not exist"): hide it.
  sys.modules['torchvision'] = None
  # Imported only now: jax reads XLA_FLAGS when its CPU backend starts.
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import DDIMScheduler, StableDiffusionPipeline  # pylint: disable=g-import-not-at-top
  from diffusers.pipelines.deprecated import StableDiffusionAttendAndExcitePipeline  # pylint: disable=g-import-not-at-top

  from benchmarks import side_by_side  # pylint: disable=g-import-not-at-top
  from lossland import parallel  # pylint: disable=g-import-not-at-top
  from lossland.guidance import schedulers, sd  # pylint: disable=g-import-not-at-top

  load_before = round(os.getloadavg()[0], 2)
  torch.set_num_threads(side_by_side.threads())
  torch.manual_seed(0)

  # --- the same folder, scheduler, prompts and z_T on both sides
  t0 = time.perf_counter()
  pipe = StableDiffusionPipeline.from_pretrained(args.folder, safety_checker=None,
                                                 requires_safety_checker=False,
                                                 torch_dtype=torch.float32)
  pipe.set_progress_bar_config(disable=True)
  ddim = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
  pipe.scheduler = ddim
  ddim_config = {k: v for k, v in dict(ddim.config).items() if not k.startswith('_')}
  ddim_config['_class_name'] = 'DDIMScheduler'
  model = sd.load_stable_diffusion(args.folder)
  scheduler = schedulers.scheduler_from_config(ddim_config, args.steps)
  print(f'loaded {args.folder} in {time.perf_counter() - t0:.1f} s')

  b = args.batch
  prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
  concepts = [list(CONCEPTS[i % len(CONCEPTS)]) for i in range(b)]
  token_indices = sd.concept_positions(model.tokenizer, prompts, concepts)
  z_nhwc = sd.initial_latents(range(b), model.latent_size, model.latent_channels)
  z_nchw = torch.tensor(z_nhwc.transpose(0, 3, 1, 2).copy())
  pixels = model.latent_size * pipe.vae_scale_factor
  common = dict(prompt=prompts, num_inference_steps=args.steps, guidance_scale=args.cfg,
                output_type='latent', height=pixels, width=pixels)

  devices = jax.devices()
  meshes = {'lossland': parallel.make_mesh({'data': len(devices)}, devices)}
  if len(devices) > 1:
    meshes['lossland_1dev'] = parallel.make_mesh({'data': 1}, devices[:1])

  def lossland_runner(sampler, **kw):
    def run():
      out = sampler(prompts, latents=z_nhwc, cfg_scale=args.cfg, decode=False, **kw)
      return np.asarray(jax.block_until_ready(out.latents))
    return run

  def diffusers_runner(pipeline, **kw):
    def run():
      with torch.inference_mode(not kw):  # A&E needs autograd for its latent updates
        out = pipeline(latents=z_nchw.clone(), **common, **kw).images
      return out.detach().numpy().transpose(0, 2, 3, 1)
    return run

  def compare(name, contenders, **extra):
    outs = {k: fn() for k, fn in contenders.items()}  # also the warm-up (compiles) of each
    ref = outs['diffusers']
    diffs = {f'max_abs_diff_{k}_vs_diffusers': float(np.abs(v - ref).max())
             for k, v in outs.items() if k != 'diffusers'}
    scale = float(np.abs(ref).max())
    for k, v in diffs.items():
      print(f'{name}: {k} = {v:.3g} (latents max abs {scale:.3g})')
    times = side_by_side.alternate(contenders, rounds=args.rounds, warmup=0)
    return side_by_side.report(
        name, times, load_before=load_before, devices=len(devices), batch=b, steps=args.steps,
        folder=os.path.basename(os.path.normpath(args.folder)), latents_max_abs=scale, **diffs,
        **extra)

  if args.profile:
    ids = np.asarray(model.tokenizer.encode(prompts + [''] * b), np.int32)
    profile(model, pipe, jax.jit(model.encode_text)(model.params, ids), args)
    return
  records = {}
  if args.only in (None, 'unguided'):
    contenders = {k: lossland_runner(sd.make_sd_sampler(model, 'baseline', scheduler=scheduler,
                                                        mesh=mesh))
                  for k, mesh in meshes.items()}
    contenders['diffusers'] = diffusers_runner(pipe)
    records['unguided'] = compare('sd_unguided_vs_diffusers', contenders)

  if args.only in (None, 'attend_excite'):
    if args.ae_fixture:
      ae = FIXTURE_AE
    else:  # the arm's defaults, as diffusers' pipeline arguments
      guidance, scale = sd.arm_guidance('attend_excite', len(scheduler.timesteps))
      ae = dict(max_iter_to_alter=guidance.num_guided_steps, scale_factor=scale,
                thresholds={k: round(1.0 - v, 6) for k, v in zip(guidance.refine_steps,
                                                       guidance.refine_targets)})
    steps = tuple(sorted(ae['thresholds']))
    settings = dict(num_guided_steps=ae['max_iter_to_alter'], refine_steps=steps,
                    refine_targets=tuple(1.0 - ae['thresholds'][k] for k in steps))
    contenders = {k: lossland_runner(sd.make_sd_sampler(model, 'attend_excite',
                                                        scheduler=scheduler, mesh=mesh,
                                                        **settings),
                                     token_indices=token_indices,
                                     step_scale=ae['scale_factor'])
                  for k, mesh in meshes.items()}
    ae_pipe = StableDiffusionAttendAndExcitePipeline(
        **{k: pipe.components[k] for k in ('vae', 'text_encoder', 'tokenizer', 'unet',
                                           'safety_checker', 'feature_extractor')},
        scheduler=ddim, requires_safety_checker=False)
    ae_pipe.set_progress_bar_config(disable=True)
    contenders['diffusers'] = diffusers_runner(
        ae_pipe, token_indices=token_indices.tolist(),
        max_iter_to_alter=ae['max_iter_to_alter'], thresholds=dict(ae['thresholds']),
        scale_factor=ae['scale_factor'], attn_res=(16, 16))
    records['attend_excite'] = compare(
        'sd_attend_excite_vs_diffusers', contenders,
        ae_settings={'max_iter_to_alter': ae['max_iter_to_alter'],
                     'thresholds': {str(k): v for k, v in ae['thresholds'].items()},
                     'scale_factor': ae['scale_factor']})

  if len(records) == 2:
    u, g = records['unguided'], records['attend_excite']
    for k in meshes:
      print(f'{k}: attend_excite / unguided = '
            f'{g[f"{k}_median_s"] / u[f"{k}_median_s"]:.2f} (target <= 1.5)')
    print(f'diffusers: attend_excite / unguided = '
          f'{g["diffusers_median_s"] / u["diffusers_median_s"]:.2f}')


if __name__ == '__main__':
  main()
