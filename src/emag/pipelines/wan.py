"""WanEMAGPipeline: diffusers' Wan 2.1 text-to-video pipeline with guidance terms (EMAG and the others).

The call prepares Wan's inputs (umT5 encodings, video latents, the schedule) and runs its sampler loop;
the guidance terms' passes and combination are the engine's, over the video-token grid
(:mod:`emag.families.wan`). Wan 2.2's two-expert models (``transformer_2``) and per-token timesteps
(``expand_timesteps``) are refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import WanPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

from ..families.wan import WAN
from ..guidance.call import terms_of_call, text_weakenings
from ..guidance.emag import EMAG
from ..inputs import warn_unused_negative
from ..plumbing.conditions import TextCondition
from ..plumbing.exclusive import one_call_at_a_time
from ._guided import GuidedPipeline, base_arguments, flow_contexts


class WanEMAGPipeline(GuidedPipeline, WanPipeline):
    r"""Wan 2.1 text-to-video with Exponential Moving Average Guidance and the other guidance terms.

    Accepts every argument of :class:`diffusers.WanPipeline` plus ``emag`` (an :class:`emag.EMAG`,
    paired with ``CFG(guidance_scale)``) or ``guidance`` (a list of terms). With neither the call is
    exactly the base pipeline's.
    """

    family = WAN

    @one_call_at_a_time
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        negative_prompt: str | list[str] = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        guidance_scale_2: float | None = None,
        num_videos_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str | None = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        emag: EMAG | None = None,
        guidance: list | None = None,
        batching: str = "normal",
        fast: bool = True,
        combine_space: str = "auto",
        on_step_outputs: Callable | None = None,
    ) -> WanPipelineOutput | tuple:
        base_args = base_arguments(locals())
        counts = {"num_videos_per_prompt": (num_videos_per_prompt, "videos generated per prompt")}
        counts["num_inference_steps"] = (num_inference_steps, "the number of sampling steps")
        counts["num_frames"] = (num_frames, "frames of the video")
        self._begin_call(guided=emag is not None or guidance is not None, on_step_outputs=on_step_outputs,
                         batching=batching, combine_space=combine_space, fast=fast, guidance_scale=guidance_scale,
                         counts=counts)
        if emag is None and guidance is None:
            return super().__call__(**base_args)

        # -- everything is checked before any expensive work ----------------------------------------
        if self.transformer is None or self.transformer_2 is not None or self.config.boundary_ratio is not None:
            raise NotImplementedError("Guidance terms on Wan 2.2's two-expert models (transformer_2, boundary_ratio) "
                                      "are not supported: use a single-transformer Wan 2.1 model.")
        if self.config.expand_timesteps:
            raise NotImplementedError("Guidance terms with per-token timesteps (Wan 2.2 TI2V, expand_timesteps) are not "
                                      "supported.")
        terms = terms_of_call(guidance, emag, guidance_scale, self.family)
        if text_weakenings(terms):
            raise NotImplementedError("ERG's text_tau (C-ERG) is implemented for SD3 only.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(prompt, negative_prompt, height, width, prompt_embeds, negative_prompt_embeds,
                          callback_on_step_end_tensor_inputs, guidance_scale_2)
        if num_frames % self.vae_scale_factor_temporal != 1:
            num_frames = num_frames // self.vae_scale_factor_temporal * self.vae_scale_factor_temporal + 1
        num_frames = max(num_frames, 1)
        _, ph, pw = self.transformer.config.patch_size  # diffusers' rounding to whole patches
        height = height // (self.vae_scale_factor_spatial * ph) * (self.vae_scale_factor_spatial * ph)
        width = width // (self.vae_scale_factor_spatial * pw) * (self.vae_scale_factor_spatial * pw)
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if isinstance(prompt, list) else prompt_embeds.shape[0]
        device = self._execution_device
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        contexts = flow_contexts(self.scheduler, timesteps)
        samples = batch_size * num_videos_per_prompt
        setup = self._guided_setup(terms, guidance_scale, num_steps=len(timesteps), batch_size=samples, device=device,
                                   fast=fast)
        warn_unused_negative(setup.uses_uncond, base_args)
        runtimes = self._guided_runtimes(terms, setup, contexts)

        # -- inputs ---------------------------------------------------------------------------------
        embeds, n_embeds = self.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=setup.uses_uncond,
            num_videos_per_prompt=num_videos_per_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, max_sequence_length=max_sequence_length, device=device)
        dtype = self.transformer.dtype
        conditions = {"cond": TextCondition(embeds.to(dtype))}
        if setup.uses_uncond:
            conditions["uncond"] = TextCondition(n_embeds.to(dtype))
        latents = self.prepare_latents(samples, self.transformer.config.in_channels, height, width, num_frames,
                                       torch.float32, device, generator, latents)
        self._num_timesteps = len(timesteps)
        self.scheduler.set_begin_index(0)
        engine = self._guided_engine(terms, runtimes, conditions, setup, batching, combine_space,
                                     observer=on_step_outputs, attention_kwargs=attention_kwargs)

        # -- the sampler loop ------------------------------------------------------------------------
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        with engine.installed(), self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                noise_pred = engine.predict(latents, t, contexts[i])
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    available = {"latents": latents, "prompt_embeds": engine.conditions["cond"].embeds}
                    outputs = callback_on_step_end(self, i, t, {k: available[k] for k in callback_on_step_end_tensor_inputs})
                    latents = outputs.pop("latents", latents)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        self._current_timestep = None
        self._record(runtimes)
        if output_type == "latent":
            video = latents
        else:
            video = self.video_processor.postprocess_video(self.decode_latents(latents, unit=False),
                                                           output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return WanPipelineOutput(frames=video)

    def decode_latents(self, latents, unit: bool = True):
        """Videos ``[B, 3, F, H, W]`` from latents (or x0 predictions): in [0, 1] (``unit``), else the VAE's
        [-1, 1] output; de-normalised with the VAE's latent mean and std as diffusers' pipeline does."""
        cfg = self.vae.config
        latents = latents.to(self.vae.dtype)
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        video = self.vae.decode(latents / inv_std + mean, return_dict=False)[0]
        return (video / 2 + 0.5).clamp(0, 1) if unit else video
