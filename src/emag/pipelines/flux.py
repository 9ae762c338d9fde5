"""FluxEMAGPipeline: diffusers' Flux.1 pipeline with guidance terms (EMAG and the others).

Flux.1-dev is guidance-distilled: ``guidance_scale`` stays what it is in diffusers (the embedded
guidance value), and the guidance terms act on the conditional prediction: EMAG alone is
``c_e + w_e (c - c_e)``, a perturbation term adds ``s (c - p)``. Terms that need an unconditional
prediction (CFG, APG, CADS' CFG, CFG-Zero*, ...) get one from the negative prompt (``""`` when none is
given), as diffusers' ``true_cfg_scale``. The call prepares Flux's inputs and runs its sampler loop on
packed latents; the engine sees them unpacked (:mod:`emag.families.flux`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

from ..families.flux import FLUX, pack, unpack
from ..guidance.call import terms_of_call, text_weakenings
from ..guidance.emag import EMAG
from ..inputs import check_guidance_scale, warn_unused_negative
from ..plumbing.conditions import TextCondition
from ..plumbing.exclusive import one_call_at_a_time
from ._guided import GuidedPipeline, base_arguments, flow_contexts


class FluxEMAGPipeline(GuidedPipeline, FluxPipeline):
    r"""Flux.1 (dev / schnell) with Exponential Moving Average Guidance and the other guidance terms.

    Accepts every argument of :class:`diffusers.FluxPipeline` plus ``emag`` (an :class:`emag.EMAG`; with
    a negative prompt and ``true_cfg_scale > 1`` paired with true CFG) or ``guidance`` (a list of terms).
    Layers are addressed within Flux's two block lists: ``"double:8-10"``, ``"single:5"``. With neither
    ``emag`` nor ``guidance`` the call is exactly the base pipeline's. ``batching``, ``fast``,
    ``combine_space`` and ``on_step_outputs`` as in :class:`emag.StableDiffusion3EMAGPipeline`.
    """

    family = FLUX

    @one_call_at_a_time
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image=None,
        negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        emag: EMAG | None = None,
        guidance: list | None = None,
        batching: str = "normal",
        fast: bool = True,
        combine_space: str = "auto",
        on_step_outputs: Callable | None = None,
    ) -> FluxPipelineOutput | tuple:
        base_args = base_arguments(locals())
        check_guidance_scale(true_cfg_scale)
        counts = {"num_images_per_prompt": (num_images_per_prompt, "images generated per prompt")}
        if sigmas is None:
            counts["num_inference_steps"] = (num_inference_steps, "the number of sampling steps")
        self._begin_call(guided=emag is not None or guidance is not None, on_step_outputs=on_step_outputs,
                         batching=batching, combine_space=combine_space, fast=fast, guidance_scale=guidance_scale,
                         counts=counts)
        if emag is None and guidance is None:
            return super().__call__(**base_args)

        # -- everything is checked before any expensive work ----------------------------------------
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        cfg_scale = true_cfg_scale if has_negative else 1.0  # diffusers' true CFG, the legacy arguments'
        terms = terms_of_call(guidance, emag, cfg_scale, self.family)
        if any(x is not None for x in (ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image,
                                       negative_ip_adapter_image_embeds)):
            raise NotImplementedError("Guidance terms with IP-Adapter are not supported: its processor calls attention twice.")
        if text_weakenings(terms):
            raise NotImplementedError("ERG's text_tau (C-ERG) re-encodes the prompt with weakened CLIP/T5 encoders; it "
                                      "is implemented for SD3 only. Use ERG's attention part (layers) on Flux.")
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            prompt, prompt_2, height, width, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if isinstance(prompt, list) else prompt_embeds.shape[0]
        device = self._execution_device
        samples = batch_size * num_images_per_prompt

        # -- inputs ---------------------------------------------------------------------------------
        latents, _ = self.prepare_latents(samples, self.transformer.config.in_channels // 4, height, width,
                                          self._embeds_dtype(prompt_embeds), device, generator, latents)
        h_lat, w_lat = 2 * (int(height) // (self.vae_scale_factor * 2)), 2 * (int(width) // (self.vae_scale_factor * 2))
        timesteps, num_inference_steps = self._timesteps(num_inference_steps, latents.shape[1], sigmas, device)
        num_steps = len(timesteps)
        setup = self._guided_setup(terms, cfg_scale, num_steps=num_steps, batch_size=samples, device=device, fast=fast)
        warn_unused_negative(setup.uses_uncond, base_args)
        contexts = flow_contexts(self.scheduler, timesteps)
        runtimes = self._guided_runtimes(terms, setup, contexts)
        lora_scale = (joint_attention_kwargs or {}).get("scale", None)
        encode = dict(device=device, num_images_per_prompt=num_images_per_prompt,
                      max_sequence_length=max_sequence_length, lora_scale=lora_scale)
        embeds, pooled, _ = self.encode_prompt(prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds,
                                               pooled_prompt_embeds=pooled_prompt_embeds, **encode)
        conditions = {"cond": TextCondition(embeds, pooled)}
        if setup.uses_uncond:
            if negative_prompt_embeds is None and negative_prompt is None:
                negative_prompt = [""] * batch_size
            n_embeds, n_pooled, _ = self.encode_prompt(
                prompt=negative_prompt, prompt_2=negative_prompt_2, prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=negative_pooled_prompt_embeds, **encode)
            conditions["uncond"] = TextCondition(n_embeds, n_pooled)
        self._num_timesteps = num_steps
        engine = self._guided_engine(terms, runtimes, conditions, setup, batching, combine_space,
                                     observer=on_step_outputs, guidance=guidance_scale,
                                     joint_attention_kwargs=self.joint_attention_kwargs)

        # -- the sampler loop (diffusers' Flux loop, the engine's guided prediction) ------------------
        self.scheduler.set_begin_index(0)
        num_warmup_steps = max(num_steps - num_inference_steps * self.scheduler.order, 0)
        with engine.installed(), self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                noise_pred = pack(engine.predict(unpack(latents, h_lat, w_lat), t, contexts[i]))
                latents_dtype = latents.dtype
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if latents.dtype != latents_dtype and torch.backends.mps.is_available():
                    latents = latents.to(latents_dtype)
                if callback_on_step_end is not None:
                    available = {"latents": latents, "prompt_embeds": engine.conditions["cond"].embeds}
                    outputs = callback_on_step_end(self, i, t, {k: available[k] for k in callback_on_step_end_tensor_inputs})
                    latents = outputs.pop("latents", latents)
                    if "prompt_embeds" in outputs:
                        engine.conditions["cond"] = TextCondition(outputs.pop("prompt_embeds"), pooled)
                if i == num_steps - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        self._current_timestep = None
        self._record(runtimes)
        if output_type == "latent":
            image = latents
        else:
            image = self.decode_latents(unpack(latents, h_lat, w_lat), unit=False)
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return FluxPipelineOutput(images=image)

    def _embeds_dtype(self, prompt_embeds) -> torch.dtype:
        """The dtype diffusers' Flux pipeline gives the latents: its prompt embeddings'."""
        if prompt_embeds is not None:
            return prompt_embeds.dtype
        return self.text_encoder_2.dtype if self.text_encoder_2 is not None else self.transformer.dtype

    def _timesteps(self, num_inference_steps, image_seq_len, sigmas, device):
        """Flux's schedule: linearly spaced sigmas shifted by the resolution-dependent ``mu``."""
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        if getattr(self.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            image_seq_len,
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        return retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)

    def decode_latents(self, latents, unit: bool = True):
        """Images ``[B, 3, H, W]`` from unpacked latents ``[B, 16, h, w]`` (or x0 predictions): in [0, 1]
        (``unit``), else the VAE's [-1, 1] output."""
        latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
        image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1) if unit else image
