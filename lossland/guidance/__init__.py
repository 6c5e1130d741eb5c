"""Test-time cross-attention losses and guided DDIM samplers for text-to-image diffusion.

A-STAR (Agarwal et al., ICCV 2023): segregation + retention losses;
Attend-and-Excite (Chefer et al. 2023); Divide & Bind (Li et al. 2023)
attendance and binding. Demonstrated on `lossland.models.TextUNet` trained on
the embedded `shapes32` dataset (`lossland.data.shapes`).
"""
from lossland.guidance.diffusion import (Schedule, cfg_eps, ddim_step, ddim_timesteps,
                                         diffusion_loss, linear_schedule, q_sample)
from lossland.guidance.losses import (astar_loss, attend_excite_loss, batched, binarize,
                                      divide_bind_attendance, divide_bind_binding, jensen_shannon,
                                      otsu_threshold, retention_loss, segregation_loss,
                                      total_variation)
from lossland.guidance.localization import map_localization
from lossland.guidance.maps import (available_resolutions, average_maps, gaussian_kernel,
                                    gaussian_smooth, token_maps)
from lossland.guidance.sampler import LOSSES, Guidance, make_sampler, step_size_schedule, to_uint8
from lossland.guidance.tokens import check_token_indices, concept_indices, text_mask

__all__ = ['Guidance', 'LOSSES', 'Schedule', 'astar_loss', 'attend_excite_loss',
           'available_resolutions', 'average_maps', 'batched', 'binarize', 'cfg_eps',
           'check_token_indices', 'concept_indices', 'ddim_step', 'ddim_timesteps',
           'diffusion_loss', 'divide_bind_attendance', 'divide_bind_binding', 'gaussian_kernel',
           'gaussian_smooth', 'jensen_shannon', 'linear_schedule', 'make_sampler',
           'map_localization', 'otsu_threshold', 'q_sample', 'retention_loss', 'segregation_loss',
           'step_size_schedule', 'text_mask', 'to_uint8', 'token_maps', 'total_variation']
