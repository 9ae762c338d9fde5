"""SanaEMAGPipeline: diffusers' Sana pipeline with the guidance terms defined on linear attention.

EMAG runs as its Q variant (``EMAG(variant="q")``); the methods that need a softmax attention map are
refused before any work (:mod:`emag.families.sana` says why). The call prepares Sana's inputs (Gemma
encodings with their padding masks, latents, the schedule, the resolution binning) and runs its sampler
loop; the guidance terms' passes and combination are the engine's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import SanaPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
from diffusers.pipelines.sana.pipeline_output import SanaPipelineOutput
from diffusers.pipelines.sana.pipeline_sana import ASPECT_RATIO_4096_BIN, retrieve_timesteps

from ..families.sana import SANA
from ..guidance.call import terms_of_call, text_weakenings
from ..guidance.emag import EMAG
from ..inputs import warn_unused_negative
from ..plumbing.conditions import TextCondition
from ..plumbing.exclusive import one_call_at_a_time
from ._guided import GuidedPipeline, base_arguments, flow_contexts
from .pixart import binned_output, binned_size, decoded

BINS = {128: ASPECT_RATIO_4096_BIN, 64: ASPECT_RATIO_2048_BIN, 32: ASPECT_RATIO_1024_BIN, 16: ASPECT_RATIO_512_BIN}
_NOT_GIVEN = object()


class SanaEMAGPipeline(GuidedPipeline, SanaPipeline):
    r"""Sana with the guidance terms defined on its linear attention (EMAG's Q variant, SEG, the
    whole-block methods, the CFG family).

    Accepts every argument of :class:`diffusers.SanaPipeline` plus ``emag`` (an :class:`emag.EMAG` with
    ``variant="q"``, paired with ``CFG(guidance_scale)``) or ``guidance`` (a list of terms). With neither
    the call is exactly the base pipeline's.
    """

    family = SANA

    @one_call_at_a_time
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        negative_prompt: str = "",
        num_inference_steps: int = 20,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        guidance_scale: float = 4.5,
        num_images_per_prompt: int | None = 1,
        height: int = 1024,
        width: int = 1024,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        clean_caption: bool = False,
        use_resolution_binning: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 300,
        complex_human_instruction: Any = _NOT_GIVEN,
        emag: EMAG | None = None,
        guidance: list | None = None,
        batching: str = "normal",
        fast: bool = True,
        combine_space: str = "auto",
        on_step_outputs: Callable | None = None,
    ) -> SanaPipelineOutput | tuple:
        base_args = base_arguments(locals())
        if complex_human_instruction is _NOT_GIVEN:  # diffusers' default instruction
            base_args.pop("complex_human_instruction")
        counts = {"num_images_per_prompt": (num_images_per_prompt, "images generated per prompt")}
        if timesteps is None and sigmas is None:
            counts["num_inference_steps"] = (num_inference_steps, "the number of sampling steps")
        self._begin_call(guided=emag is not None or guidance is not None, on_step_outputs=on_step_outputs,
                         batching=batching, combine_space=combine_space, fast=fast, guidance_scale=guidance_scale,
                         counts=counts)
        if emag is None and guidance is None:
            return super().__call__(**base_args)

        # -- everything is checked before any expensive work ----------------------------------------
        terms = terms_of_call(guidance, emag, guidance_scale, self.family)
        if text_weakenings(terms):
            raise NotImplementedError("ERG's text_tau (C-ERG) is implemented for SD3 only.")
        orig_size = (height, width)
        if use_resolution_binning:
            height, width = binned_size(self, BINS, height, width)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(prompt, height, width, callback_on_step_end_tensor_inputs, negative_prompt, prompt_embeds,
                          negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask)
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if isinstance(prompt, list) else prompt_embeds.shape[0]
        device = self._execution_device
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps,
                                                            sigmas)
        contexts = flow_contexts(self.scheduler, timesteps)
        setup = self._guided_setup(terms, guidance_scale, num_steps=len(timesteps),
                                   batch_size=batch_size * num_images_per_prompt, device=device, fast=fast)
        warn_unused_negative(setup.uses_uncond, {k: v for k, v in base_args.items() if k != "negative_prompt"})
        runtimes = self._guided_runtimes(terms, setup, contexts)

        # -- inputs ---------------------------------------------------------------------------------
        if negative_prompt is None and negative_prompt_embeds is None:
            negative_prompt = ""  # the base pipeline's default (a caller may pass None for "none given")
        encode = dict(negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt, device=device,
                      prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                      prompt_attention_mask=prompt_attention_mask,
                      negative_prompt_attention_mask=negative_prompt_attention_mask, clean_caption=clean_caption,
                      max_sequence_length=max_sequence_length,
                      lora_scale=(attention_kwargs or {}).get("scale", None))
        if complex_human_instruction is not _NOT_GIVEN:
            encode["complex_human_instruction"] = complex_human_instruction
        embeds, mask, n_embeds, n_mask = self.encode_prompt(prompt, setup.uses_uncond, **encode)
        conditions = {"cond": TextCondition(embeds, None, mask)}
        if setup.uses_uncond:
            conditions["uncond"] = TextCondition(n_embeds, None, n_mask)
        latents = self.prepare_latents(batch_size * num_images_per_prompt, self.transformer.config.in_channels, height,
                                       width, torch.float32, device, generator, latents)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        self._num_timesteps = len(timesteps)
        engine = self._guided_engine(terms, runtimes, conditions, setup, batching, combine_space,
                                     observer=on_step_outputs, attention_kwargs=attention_kwargs)

        # -- the sampler loop ------------------------------------------------------------------------
        channels = self.transformer.config.in_channels
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        with engine.installed(), self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                out = engine.predict(latents, t, contexts[i])
                if self.transformer.config.out_channels // 2 == channels:
                    out = out[:, :channels]
                latents = self.scheduler.step(out, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    available = {"latents": latents, "prompt_embeds": engine.conditions["cond"].embeds}
                    outputs = callback_on_step_end(self, i, t, {k: available[k] for k in callback_on_step_end_tensor_inputs})
                    latents = outputs.pop("latents", latents)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        self._record(runtimes)
        image = binned_output(self, latents, output_type, orig_size if use_resolution_binning else None)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return SanaPipelineOutput(images=image)

    def decode_latents(self, latents):
        """Images ``[B, 3, H, W]`` in [0, 1] from latents (or x0 predictions)."""
        return (decoded(self, latents) / 2 + 0.5).clamp(0, 1)
