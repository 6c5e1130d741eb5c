"""Config -> objects for the launchers (the only place ConfigDicts are unpacked)."""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec

from lossland import data as data_lib
from lossland import models
from lossland import parallel
from lossland import train as train_lib
from lossland.errors import UserError

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


# What libtpu would otherwise ask the GCE metadata server about this host: on a machine
# without TPU chips (AOT compiles for a topology, `launch.compile`) it finds nothing and
# prints errors ('could not determine TPU accelerator type', 'unexpected worker hostname').
# A single host with no other workers; the topologies compiled for are given explicitly.
NO_TPU_HOST_ENV = {'TPU_SKIP_MDS_QUERY': '1', 'TPU_WORKER_HOSTNAMES': 'localhost',
                   'TPU_HOST_BOUNDS': '1,1,1'}


def _visible_accelerators() -> tuple[int, bool] | None:
  """(TPU chips, whether a GPU is visible) by jax's own PCI probes; None if jax has none."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return (hardware_utils.num_available_tpu_chips_and_device_id()[0],
            bool(hardware_utils.has_visible_nvidia_gpu()
                 or hardware_utils.num_available_amd_gpus(stop_at=1)))
  except Exception:  # noqa: BLE001 - another jax version: leave the choice to jax
    return None


def quiet_platforms() -> None:
  """Keeps libtpu's errors out of runs on machines without TPU chips.

  With libtpu installed (the `test` and `tpu` extras) jax also tries to start a
  TPU runtime, which on a machine without TPU chips prints several lines of
  libtpu errors ('could not determine TPU accelerator type', 'unexpected worker
  hostname') before falling back to the CPU. When jax's hardware probes see no
  TPU chip, this sets `NO_TPU_HOST_ENV` (unless already set) so that libtpu,
  when it loads for an AOT compile (`launch.compile`), describes this host
  quietly; and when they see no GPU either, and neither `JAX_PLATFORMS` nor
  `JAX_FORCE_TPU_INIT` is set, it sets `jax_platforms` to 'cpu' so libtpu does
  not load at all. On a TPU or GPU machine it changes nothing. Call it before
  anything asks jax for devices: `jax_platforms` only counts before jax starts
  its backends.
  """
  found = _visible_accelerators()
  if found is None or found[0]:
    return
  for key, value in NO_TPU_HOST_ENV.items():
    os.environ.setdefault(key, value)
  if found[1] or os.environ.get('JAX_PLATFORMS') or 'JAX_FORCE_TPU_INIT' in os.environ:
    return
  if not jax.config.jax_platforms:  # not already chosen in code (e.g. a test's conftest)
    jax.config.update('jax_platforms', 'cpu')


def use_host_cores() -> None:
  """On CPU, one XLA device per host core, unless `XLA_FLAGS` is already set.

  XLA reads the flag when jax starts its backend (the first device query), not
  at import, so `config_cli.parse` calls this before anything asks for
  devices; importing `launch` changes nothing. Accelerator platforms ignore it.
  """
  os.environ.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count={os.cpu_count() or 1}')


def build_mesh(mesh_config: ml_collections.ConfigDict, batch_size: int | None = None):
  """A mesh over this job's devices. `data=-1` takes the most devices that divide the batch."""
  devices = jax.devices()
  axes = {'data': mesh_config.data, 'model': mesh_config.model}
  if axes['data'] == -1 and batch_size is not None and axes['model'] != -1:
    usable = len(devices) // axes['model']
    if usable == 0:
      raise UserError(f'mesh.model={axes["model"]} exceeds the {len(devices)} devices of this '
                      f'job; set --config.mesh.model to at most {len(devices)}')
    axes['data'] = max(d for d in range(1, usable + 1) if batch_size % d == 0)
    devices = devices[:axes['data'] * axes['model']]
  return parallel.make_mesh(axes, devices)


def param_rules(config: ml_collections.ConfigDict):
  return [(pattern, PartitionSpec(*spec)) for pattern, spec in config.get('param_rules', ())]


def build_text_corpus(data: ml_collections.ConfigDict) -> data_lib.TextCorpus:
  if data.source == 'file':
    if not data.path:
      raise UserError('data.source is "file" but data.path is empty; pass '
                      '--config.data.path=/path/to/text.txt')
    return data_lib.load_text_file(data.path, vocab=data.vocab)
  return data_lib.load_tfds_text(data.source, vocab=data.vocab, data_dir=data.data_dir or None,
                                 text_key=data.get('text_key', 'text'),
                                 validation_split=data.get('validation_split', 'validation'))


def build_model(model: ml_collections.ConfigDict, **overrides):
  kwargs = {k: v for k, v in model.items() if k != 'name'}
  kwargs.update(overrides)
  if kwargs.get('matmul_dtype') == 'auto':  # bfloat16 only where the hardware has bf16 dots
    kwargs['matmul_dtype'] = models.preferred_matmul_dtype(jax.default_backend())
  for key in ('dtype', 'matmul_dtype'):
    if isinstance(kwargs.get(key), str):
      kwargs[key] = DTYPES[kwargs[key]]
  factories = {'transformer_lm': models.TransformerLM, 'vit': models.ViT, 'mlp': models.MLP,
               'cnn': models.CNN}
  if model.name not in factories:
    raise UserError(f'unknown model.name {model.name!r} (config key model.name); available: '
                    f'{sorted(factories)}')
  return factories[model.name](**kwargs)


def learned_positions(model) -> int | None:
  """Rows of `model`'s learned position table, or None when any length works (rotary).

  A `models.CausalLM` with `config.positions == 'learned'` (GPT-2 and its imports)
  has `config.max_positions`; the reference `TransformerLM` is rotary.
  """
  config = getattr(model, 'config', None)
  if getattr(config, 'positions', None) == 'learned':
    return int(config.max_positions)
  return None


def check_seq_len(model, seq_len: int, key: str) -> None:
  """A UserError naming `--config.<key>` when `seq_len` is past `model`'s learned positions.

  Call it before training or evaluation starts: the model would otherwise refuse the
  sequence from inside its first traced call, naming no config key.
  """
  limit = learned_positions(model)
  if limit is not None and seq_len > limit:
    raise UserError(f'{key}={seq_len} is longer than the {limit} learned positions of this model '
                    f'({type(model).__name__} with positions=\'learned\'); set --config.{key} '
                    f'to at most {limit}')


def build_optimizer(t: ml_collections.ConfigDict):
  schedule = train_lib.warmup_cosine(t.learning_rate, t.warmup_steps, t.num_steps, t.final_lr)
  return train_lib.adamw(learning_rate=schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                         grad_clip=t.grad_clip)


def stored_config(config: ml_collections.ConfigDict, free_keys) -> dict:
  """The config as a plain dict without `free_keys` (dotted; a key covers its subtree).

  What `WORKDIR/config.json` stores and a re-run on the workdir must match.
  """
  tree = config.to_dict()
  for dotted in free_keys:
    *parents, leaf = dotted.split('.')
    node = tree
    for part in parents:
      node = node.get(part, {})
    node.pop(leaf, None)
  return tree


def write_results(workdir: str | None, results: dict) -> None:
  """Writes `WORKDIR/results.json` whole: a kill leaves the old file or the new one."""
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, 'results.json')
    with open(path + '.tmp', 'w') as f:
      json.dump(results, f, indent=2, sort_keys=True)
    os.replace(path + '.tmp', path)


def print_table(results: dict) -> None:
  width = max(len(k) for k in results)
  for key in sorted(results):
    value = results[key]
    if isinstance(value, float):
      value = f'{value:.4f}' if math.isfinite(value) and abs(value) < 1e6 else f'{value:.4g}'
    print(f'{key:<{width}}  {value}')
