"""Test-time cross-attention losses and guided DDIM samplers for text-to-image diffusion.

A-STAR (Agarwal et al., ICCV 2023): segregation + retention losses;
Attend-and-Excite (Chefer et al. 2023); Divide & Bind (Li et al. 2023)
attendance and binding. Works on any linen denoiser
`apply_fn(params, x, t, tokens, **apply_kwargs) -> ε` whose cross-attention
probabilities are reachable through `lossland.taps` (`taps.AttentionWeights`
layers, the default `AttentionSource`) or sown (`AttentionSource(sown=NAME)`).
Demonstrated on `lossland.models.TextUNet` trained on the embedded `shapes32`
dataset (`lossland.data.shapes`). Typical use:

    sample = make_sampler(model.apply, linear_schedule(), num_steps=25,
                          null_tokens=empty_caption, guidance=Guidance('astar'))
    out = sample(params, {'noise': z, 'tokens': tokens, 'text_mask': mask,
                          'token_indices': concepts}, cfg_scale=5.0,
                 step_sizes=step_size_schedule(16.0, 25))    # -> Samples

`runner` holds the shapes32 concept-neglect evaluation, `checkpoints` the
trained-model folders, `training` the training data and schedule.

Stable Diffusion 1.x/2.x from a local diffusers folder (`sd`; models in
`lossland.models.sd_unet`, `clip_text`, `sd_vae`, import in
`lossland.interop.diffusers`), with diffusers' DDIM and PNDM (`schedulers`)
and paired-seed runs of every arm (`sd_runs`):

    model = load_stable_diffusion('/ckpts/stable-diffusion-v1-5')
    out = make_sd_sampler(model, 'astar')(['a cat and a dog'] * 4,
                                          concepts=[['cat', 'dog']] * 4, seeds=range(4))
"""
from lossland.guidance.attention import AttentionSource, apply_with_attention
from lossland.guidance.diffusion import (Schedule, cfg_eps, ddim_step, ddim_timesteps,
                                         diffusion_loss, linear_schedule, q_sample)
from lossland.guidance.losses import (astar_loss, attend_excite_loss, batched, binarize,
                                      divide_bind_attendance, divide_bind_binding, jensen_shannon,
                                      otsu_threshold, retention_loss, segregation_loss,
                                      total_variation)
from lossland.guidance.localization import Localization, map_localization
from lossland.guidance.maps import (available_resolutions, average_maps, concept_maps,
                                    gaussian_kernel, gaussian_smooth, token_maps)
from lossland.guidance.sampler import (LOSSES, Guidance, Sampler, Samples, make_sampler,
                                       step_size_schedule, to_uint8)
from lossland.guidance.tokens import check_token_indices, concept_indices, text_mask
from lossland.guidance.checkpoints import has_trained, load_trained, save_trained
from lossland.guidance.schedulers import scheduler_from_config
from lossland.guidance.sd import (ARMS, SDSampler, SDSamples, StableDiffusion, arm_guidance,
                                  load_stable_diffusion, make_sd_sampler)
from lossland.guidance import checkpoints, runner, schedulers, sd, sd_runs, training

__all__ = ['ARMS', 'AttentionSource', 'SDSampler', 'SDSamples', 'StableDiffusion',
           'arm_guidance', 'load_stable_diffusion', 'make_sd_sampler', 'scheduler_from_config',
           'schedulers', 'sd', 'sd_runs', 'Guidance', 'LOSSES', 'Localization', 'Sampler', 'Samples',
           'Schedule', 'apply_with_attention', 'astar_loss', 'attend_excite_loss',
           'available_resolutions', 'average_maps', 'batched', 'binarize', 'cfg_eps',
           'check_token_indices', 'checkpoints', 'concept_indices', 'concept_maps', 'ddim_step',
           'ddim_timesteps', 'diffusion_loss', 'divide_bind_attendance', 'divide_bind_binding',
           'gaussian_kernel', 'gaussian_smooth', 'has_trained', 'jensen_shannon',
           'linear_schedule', 'load_trained', 'make_sampler', 'map_localization',
           'otsu_threshold', 'q_sample', 'retention_loss', 'runner', 'save_trained',
           'segregation_loss', 'step_size_schedule', 'text_mask', 'to_uint8', 'token_maps',
           'total_variation', 'training']
