"""StableDiffusion3EMAGPipeline: diffusers' SD3 pipeline with EMAG (emag.md section 5.1).

Each step: the normal call on ``[uncond ; cond]`` gives ``u, c``; then, inside the EMA or replacement
window, a perturbed call on the same batch in which every candidate block feeds its EMA (score D
computed BEFORE the update, so the choice at step ``i`` uses the scores of step ``i - 1``) and the
chosen block replaces its tracked rows by the freshly updated EMA. Outside both windows the perturbed
pass equals the normal one and is not run (``u_e = u``, ``c_e = c``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

from ..config import EMAG
from ..math.combine import emag_additive, emag_nested, emag_only
from ..plumbing.emag_attention import EMAGAttention, LayerAction
from ..windows import StepContext
from ._emag_run import check_windows, record_step, resolve_for


def flow_sigma_edm(sigma: float) -> float:
    """EDM-equivalent noise level of rectified-flow time ``t = sigma``: ``t / (1 - t)``."""
    return float("inf") if sigma >= 1.0 else sigma / (1.0 - sigma)


class StableDiffusion3EMAGPipeline(StableDiffusion3Pipeline):
    r"""Stable Diffusion 3 / 3.5 with Exponential Moving Average Guidance.

    Accepts every argument of :class:`diffusers.StableDiffusion3Pipeline` plus ``emag``. With
    ``emag=None`` the call is exactly the base pipeline's. Load with ``from_pretrained`` (hub id or
    local folder) or wrap an existing pipeline with ``from_pipe``. After a call, ``self.emag_trace``
    lists what EMAG did at each step.
    """

    emag_trace: list | None = None

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 256,
        skip_guidance_layers: list[int] = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: float | None = None,
        emag: EMAG | None = None,
    ) -> StableDiffusion3PipelineOutput | tuple:
        base_args = dict(locals())
        for key in ("self", "emag", "__class__"):
            base_args.pop(key, None)
        self.emag_trace = None
        if emag is None:
            return super().__call__(**base_args)

        # -- validate everything before any expensive work ------------------------------------------
        arch, cfg = resolve_for(self.transformer, emag)
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            raise NotImplementedError("EMAG with IP-Adapter is not supported: its processor calls attention twice.")
        if skip_guidance_layers is not None:
            raise NotImplementedError("Skip-layer guidance together with `emag=` is not supported in this pipeline.")
        self._guidance_scale = guidance_scale
        if cfg.combination == "additive" and not self.do_classifier_free_guidance:
            raise ValueError("EMAG combination 'additive' uses the unconditional branch: set guidance_scale > 1.")
        uses_uncond = cfg.combination != "emag_only" and self.do_classifier_free_guidance

        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            prompt, prompt_2, prompt_3, height, width,
            negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False

        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device
        lora_scale = self.joint_attention_kwargs.get("scale", None) if self.joint_attention_kwargs else None
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3,
            negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=uses_uncond,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            device=device, clip_skip=self.clip_skip, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length, lora_scale=lora_scale,
        )
        if uses_uncond:  # batch layout [uncond ; cond], as the base pipeline
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
            pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds], dim=0)

        latents = self.prepare_latents(
            batch_size * num_images_per_prompt, self.transformer.config.in_channels,
            height, width, prompt_embeds.dtype, device, generator, latents,
        )
        scheduler_kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            _, _, h, w = latents.shape
            image_seq_len = (h // self.transformer.config.patch_size) * (w // self.transformer.config.patch_size)
            scheduler_kwargs["mu"] = calculate_shift(
                image_seq_len,
                self.scheduler.config.get("base_image_seq_len", 256),
                self.scheduler.config.get("max_image_seq_len", 4096),
                self.scheduler.config.get("base_shift", 0.5),
                self.scheduler.config.get("max_shift", 1.16),
            )
        elif mu is not None:
            scheduler_kwargs["mu"] = mu
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, sigmas=sigmas, **scheduler_kwargs
        )
        num_steps = len(timesteps)
        check_windows(cfg, num_steps)
        self._num_timesteps = num_steps
        num_warmup_steps = max(num_steps - num_inference_steps * self.scheduler.order, 0)

        runtime = EMAGAttention(self.transformer, arch, cfg, score_timing="before")
        trace = []

        def predict(x_in, t, actions=None):
            kwargs = dict(
                hidden_states=x_in, timestep=t.expand(x_in.shape[0]), encoder_hidden_states=prompt_embeds,
                pooled_projections=pooled_prompt_embeds, joint_attention_kwargs=self.joint_attention_kwargs,
                return_dict=False,
            )
            if actions is None:
                return self.transformer(**kwargs)[0]
            with runtime.forward_pass(actions):
                return self.transformer(**kwargs)[0]

        with runtime.installed(), self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                sigma = float(self.scheduler.sigmas[i]) if hasattr(self.scheduler, "sigmas") else float(t) / 1000.0
                ctx = StepContext(i, num_steps, float(t), flow_sigma_edm(sigma))
                x_in = torch.cat([latents] * 2) if uses_uncond else latents
                normal = predict(x_in, t)
                u, c = normal.chunk(2) if uses_uncond else (None, normal)

                do_ema, do_apply = cfg.ema_window.contains(ctx), cfg.apply_window.contains(ctx)
                u_e, c_e = u, c
                if do_ema or do_apply:
                    chosen = runtime.choose(x_in.shape[0]) if do_apply else {}
                    trace.append(record_step(ctx, do_ema, do_apply, chosen, runtime))
                    actions = {l: LayerAction(update=do_ema, replace=chosen.get(l, False)) for l in cfg.layers}
                    perturbed = predict(x_in, t, actions)
                    u_e, c_e = perturbed.chunk(2) if uses_uncond else (None, perturbed)

                if cfg.combination == "nested":
                    noise_pred = emag_nested(u, c, c_e, self.guidance_scale, cfg.scale)
                elif cfg.combination == "additive":
                    noise_pred = emag_additive(u, c, u_e, self.guidance_scale, cfg.scale)
                else:
                    noise_pred = emag_only(c, c_e, cfg.scale)

                latents_dtype = latents.dtype
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if latents.dtype != latents_dtype and torch.backends.mps.is_available():
                    latents = latents.to(latents_dtype)

                if callback_on_step_end is not None:
                    available = {"latents": latents, "prompt_embeds": prompt_embeds,
                                 "pooled_prompt_embeds": pooled_prompt_embeds}
                    callback_kwargs = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    pooled_prompt_embeds = callback_outputs.pop("pooled_prompt_embeds", pooled_prompt_embeds)

                if i == num_steps - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        self.emag_trace = trace

        if output_type == "latent":
            image = latents
        else:
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            image = self.vae.decode(latents, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return StableDiffusion3PipelineOutput(images=image)

