"""A Stable Diffusion folder's scheduler as diffusers' StableDiffusionPipeline runs it, or DDIM.

References: `fixup_inputs` / `fixup_outputs` of tests/fixtures/sd/euler_dpm_reference.npz
(scripts/make_scheduler_fixtures.py): folder scheduler configs (outdated
steps_offset / clip_sample, fields of other classes, an unknown field) and the
config of the scheduler `StableDiffusionPipeline.__init__` leaves of each.
"""
import json
import math
import pathlib
import shutil
import warnings

import numpy as np
import pytest

from lossland.guidance import schedulers, sd

SD = pathlib.Path(__file__).resolve().parent.parent / 'fixtures' / 'sd'
REF = np.load(SD / 'euler_dpm_reference.npz')
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear')
HINT = ('make_sd_sampler(sd, arm, scheduler=schedulers.scheduler_from_config(config, '
        'num_steps))')


def _same(a, b):
  if isinstance(a, float) or isinstance(b, float):
    return math.isclose(a, b, rel_tol=1e-12) or (math.isinf(a) and a == b)
  return a == b


@pytest.mark.parametrize('k', range(len(REF['fixup_inputs'])))
def test_folder_configs_are_what_the_pipeline_runs(k):
  given = json.loads(str(REF['fixup_inputs'][k]))
  want = json.loads(str(REF['fixup_outputs'][k]))
  got, notes = schedulers.folder_config(given)
  assert got['_class_name'] == want['_class_name'] == given['_class_name']
  shared = sorted(set(got) & set(want) - {'_class_name'})
  assert shared, k
  assert [f for f in shared if not _same(got[f], want[f])] == []
  for field in ('steps_offset', 'clip_sample'):  # the pipeline's rewrites are announced
    wrote = given.get(field, schedulers.scheduler_config.DEFAULTS[given['_class_name']].get(field))
    fixed = field in want and want[field] != wrote
    assert fixed == any(n.startswith(f'{field}=') for n in notes), (field, notes)
  if 'not_a_field' in given:  # fields of other classes are dropped silently, unknown ones noted
    assert [n for n in notes if 'belong to no diffusers scheduler' in n] == [
        "fields ['not_a_field'] belong to no diffusers scheduler and are ignored, as diffusers "
        'ignores them']


def test_outdated_ddim_samples_as_the_pipeline():
  got, _ = schedulers.folder_config(dict(_class_name='DDIMScheduler', **SD_SCHEDULE))
  s = schedulers.scheduler_from_config(got, 10)
  assert list(s.timesteps) == list(range(901, 0, -100)) and s.clip_range is None


@pytest.mark.parametrize('name,spacing,offset', [
    ('EulerAncestralDiscreteScheduler', 'linspace', 0), ('LMSDiscreteScheduler', 'leading', 1),
    ('UniPCMultistepScheduler', 'trailing', 1), ('SomeNewScheduler', None, None)])
def test_classes_lossland_lacks_fall_back_to_ddim_over_their_schedule(name, spacing, offset):
  config = dict(_class_name=name, prediction_type='v_prediction', **SD_SCHEDULE)
  config.update({k: v for k, v in (('timestep_spacing', spacing), ('steps_offset', offset))
                 if v is not None})
  got, notes = schedulers.folder_config(config)
  assert got['_class_name'] == 'DDIMScheduler'
  assert (got['steps_offset'], got['clip_sample'], got['set_alpha_to_one']) == (1, False, False)
  assert got['prediction_type'] == 'v_prediction'
  assert got['timestep_spacing'] == spacing or (spacing is None and
                                                got['timestep_spacing'] == 'leading')
  note = notes[-1]
  assert note.startswith(f'lossland does not implement {name}. The folder samples with DDIM')
  assert HINT in note and 'EulerDiscreteScheduler' in note
  assert (offset == 0) == any(n.startswith('steps_offset=0 is outdated') for n in notes)
  want = schedulers.scheduler_from_config(dict(got), 10)
  ddim = schedulers.scheduler_from_config(dict(
      _class_name='DDIMScheduler', prediction_type='v_prediction', clip_sample=False,
      set_alpha_to_one=False, steps_offset=1, timestep_spacing=got['timestep_spacing'],
      **SD_SCHEDULE), 10)
  np.testing.assert_array_equal(want.timesteps, ddim.timesteps)
  np.testing.assert_array_equal(want.alpha_prev, ddim.alpha_prev)


def test_settings_lossland_lacks_fall_back_naming_them():
  config = dict(_class_name='DPMSolverMultistepScheduler', algorithm_type='sde-dpmsolver++',
                steps_offset=1, timestep_spacing='leading', **SD_SCHEDULE)
  got, notes = schedulers.folder_config(config)
  assert got['_class_name'] == 'DDIMScheduler' and len(notes) == 1
  assert notes[0].startswith("unsupported DPMSolverMultistepScheduler settings: "
                             "algorithm_type='sde-dpmsolver++' (supported: 'dpmsolver++')")
  assert HINT in notes[0]
  euler = dict(config, _class_name='EulerDiscreteScheduler', use_karras_sigmas=True)
  got, notes = schedulers.folder_config(euler)  # an implemented class and setting: no note
  assert got['_class_name'] == 'EulerDiscreteScheduler' and notes == []


def test_a_training_schedule_lossland_lacks_is_an_error():
  with pytest.raises(ValueError, match=r"LMSDiscreteScheduler config's training schedule has "
                                       r"beta_schedule='exp' \(supported: \['linear', "):
    schedulers.folder_config({'_class_name': 'LMSDiscreteScheduler', 'beta_schedule': 'exp'})
  with pytest.raises(ValueError, match='rescale_betas_zero_snr=true'):
    schedulers.folder_config(dict(_class_name='DDIMScheduler', rescale_betas_zero_snr=True,
                                  thresholding=True, steps_offset=1, clip_sample=False))


def test_loading_a_folder_warns_once_and_samples_with_the_fallback(tmp_path):
  folder = tmp_path / 'sd'
  shutil.copytree(SD / 'tiny_sd1', folder, ignore=shutil.ignore_patterns('*.npz'))
  config = dict(_class_name='EulerAncestralDiscreteScheduler', steps_offset=1,
                timestep_spacing='leading', **SD_SCHEDULE)
  (folder / 'scheduler' / 'scheduler_config.json').write_text(json.dumps(config))
  with pytest.warns(UserWarning) as record:
    model = sd.load_stable_diffusion(folder)
  assert len(record) == 1
  message = str(record[0].message)
  assert 'scheduler_config.json: lossland does not implement EulerAncestralDiscreteScheduler' in (
      message) and HINT in message
  assert model.scheduler_notes and model.scheduler_config['_class_name'] == 'DDIMScheduler'
  s = model.scheduler(10)
  assert isinstance(s, schedulers.DDIMScheduler) and s.timesteps[0] == 901


def test_the_fixture_folders_load_without_a_warning():
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    model = sd.load_stable_diffusion(SD / 'tiny_sd2')
  assert model.scheduler_notes == () and model.scheduler_config['_class_name'] == 'DDIMScheduler'
