"""StableDiffusion3EMAGPipeline: diffusers' SD3 pipeline with guidance terms (EMAG and the others).

The call prepares SD3's inputs (prompt encodings, latents, the flow-matching schedule) and runs its
sampler loop; the guidance terms' passes and combination are the engine's (:mod:`emag.engine`), the
terms' per-family protocols their own (EMAG: docs/method.md, the per-backbone protocols).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion_3.pipeline_output import (
    StableDiffusion3PipelineOutput,
)
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift,
    retrieve_timesteps,
)

from ..families import SD3
from ..guidance.call import terms_of_call, text_weakenings
from ..guidance.emag import EMAG
from ..inputs import check_sd3_call, warn_unused_negative
from ..plumbing.conditions import TextCondition
from ..plumbing.exclusive import one_call_at_a_time
from ..plumbing.text_weakening import TEXT_ENCODERS, TextWeakening, scaled_queries
from ._guided import GuidedPipeline, flow_contexts


class StableDiffusion3EMAGPipeline(GuidedPipeline, StableDiffusion3Pipeline):
    r"""Stable Diffusion 3 / 3.5 with Exponential Moving Average Guidance and the other guidance terms.

    Accepts every argument of :class:`diffusers.StableDiffusion3Pipeline` plus ``emag`` (an
    :class:`emag.EMAG`, paired with ``CFG(guidance_scale)``) or ``guidance`` (a list of terms). With
    neither the call is exactly the base pipeline's. Load with ``from_pretrained`` (hub id or local
    folder) or wrap an existing pipeline with ``from_pipe``. After a call, ``self.emag_trace`` lists what
    EMAG did at each step. ``batching``: the pass layout (``"normal"``, ``"all"``, ``"none"``, ``"auto"``);
    ``fast=False``: the reference's pass layout instead of the exact fast path; ``combine_space="x0"``
    combines every guidance term in x0 space (default ``"auto"``: only when an active term, e.g. APG, asks
    for it; affine combinations such as CFG, PAG, EMAG give the same result).
    """

    family = SD3

    @one_call_at_a_time  # one call per transformer at a time; hooks act in the calling thread only
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
        guidance: list | None = None,
        batching: str = "normal",
        fast: bool = True,
        combine_space: str = "auto",
        on_step_outputs: Callable | None = None,
    ) -> StableDiffusion3PipelineOutput | tuple:
        base_args = dict(locals())
        for key in ("self", "emag", "guidance", "batching", "fast", "combine_space", "on_step_outputs", "__class__"):
            base_args.pop(key, None)
        self.emag_trace = None
        check_sd3_call(self, guided=emag is not None or guidance is not None, batching=batching, fast=fast,
                       combine_space=combine_space, **base_args)  # before any work
        if emag is None and guidance is None:
            if on_step_outputs is not None:
                raise ValueError("on_step_outputs observes the guidance engine: give guidance=[...] (e.g. "
                                 "[emag.CFG(7.0)] for plain CFG).")
            return super().__call__(**base_args)

        # -- everything is checked before any expensive work ----------------------------------------
        terms = terms_of_call(guidance, emag, guidance_scale, self.family)
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            raise NotImplementedError("Guidance terms with IP-Adapter are not supported: its processor calls attention twice.")
        if skip_guidance_layers is not None:
            raise NotImplementedError("Use emag.SLG(...) in `guidance=[...]` instead of skip_guidance_layers.")
        self._guidance_scale = guidance_scale
        weak_texts = text_weakenings(terms)
        self._check_weak_text_inputs(weak_texts, prompt, negative_prompt, negative_prompt_embeds)
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
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if isinstance(prompt, list) else prompt_embeds.shape[0]
        device = self._execution_device
        timesteps, num_inference_steps = self._timesteps(num_inference_steps, height, width, sigmas, mu, device)
        num_steps = len(timesteps)
        setup = self._guided_setup(terms, guidance_scale, num_steps=num_steps,
                                   batch_size=batch_size * num_images_per_prompt, device=device, fast=fast)
        warn_unused_negative(setup.uses_uncond, base_args)
        contexts = flow_contexts(self.scheduler, timesteps)
        runtimes = self._guided_runtimes(terms, setup, contexts)

        # -- inputs ---------------------------------------------------------------------------------
        conditions = self._conditions(
            setup.uses_uncond, weak_texts, batch_size, (prompt, prompt_2, prompt_3),
            (negative_prompt, negative_prompt_2, negative_prompt_3),
            (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds),
            dict(device=device, clip_skip=self.clip_skip, num_images_per_prompt=num_images_per_prompt,
                 max_sequence_length=max_sequence_length,
                 lora_scale=(self.joint_attention_kwargs or {}).get("scale", None)))
        prompt_embeds, pooled_prompt_embeds = conditions["cond"].embeds, conditions["cond"].pooled
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt, self.transformer.config.in_channels,
            height, width, prompt_embeds.dtype, device, generator, latents,
        )
        self._num_timesteps = num_steps
        engine = self._guided_engine(terms, runtimes, conditions, setup, batching, combine_space,
                                     observer=on_step_outputs, joint_attention_kwargs=self.joint_attention_kwargs)

        latents = self._denoise(engine, latents, timesteps, contexts, num_inference_steps, callback_on_step_end,
                                callback_on_step_end_tensor_inputs, prompt_embeds, pooled_prompt_embeds)
        self._record(runtimes)
        return self._output(latents, output_type, return_dict)

    def _denoise(self, engine, latents, timesteps, contexts, num_inference_steps, callback_on_step_end,
                 callback_tensor_inputs, prompt_embeds, pooled_prompt_embeds):
        """The sampler loop of diffusers' SD3 pipeline with the engine's guided prediction at each step
        (a callback may replace the latents and the conditional embeddings)."""
        num_steps = len(timesteps)
        num_warmup_steps = max(num_steps - num_inference_steps * self.scheduler.order, 0)
        with engine.installed(), self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                noise_pred = engine.predict(latents, t, contexts[i])
                latents_dtype = latents.dtype
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if latents.dtype != latents_dtype and torch.backends.mps.is_available():
                    latents = latents.to(latents_dtype)
                if callback_on_step_end is not None:
                    available = {"latents": latents, "prompt_embeds": prompt_embeds,
                                 "pooled_prompt_embeds": pooled_prompt_embeds}
                    callback_kwargs = {k: available[k] for k in callback_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    new_pe = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    new_ppe = callback_outputs.pop("pooled_prompt_embeds", pooled_prompt_embeds)
                    if new_pe is not prompt_embeds or new_ppe is not pooled_prompt_embeds:
                        prompt_embeds, pooled_prompt_embeds = new_pe, new_ppe
                        engine.conditions["cond"] = TextCondition(prompt_embeds, pooled_prompt_embeds)
                if i == num_steps - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        return latents

    def _conditions(self, uses_uncond: bool, weak_texts, batch_size: int, prompts: tuple, negatives: tuple,
                    embeds: tuple, encode: dict) -> dict[str, TextCondition]:
        """The branches' text conditions: the prompt's (and the negative prompt's when the call uses the
        unconditional branch), encoded as diffusers' pipeline does, and each weakened text condition."""
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = self.encode_prompt(
            prompt=prompts[0], prompt_2=prompts[1], prompt_3=prompts[2], negative_prompt=negatives[0],
            negative_prompt_2=negatives[1], negative_prompt_3=negatives[2], do_classifier_free_guidance=uses_uncond,
            prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], pooled_prompt_embeds=embeds[2],
            negative_pooled_prompt_embeds=embeds[3], **encode,
        )
        conditions = {"cond": TextCondition(prompt_embeds, pooled_prompt_embeds)}
        if uses_uncond:
            conditions["uncond"] = TextCondition(negative_prompt_embeds, negative_pooled_prompt_embeds)
        for w in weak_texts:
            conditions[w.name] = self._encode_weakened(w, batch_size, prompts, negatives, **encode)
        return conditions

    def _timesteps(self, num_inference_steps, height, width, sigmas, mu, device):
        """The flow-matching schedule (with SD3.5's resolution-dependent shift when configured)."""
        scheduler_kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            image_seq_len = (height // self.vae_scale_factor // self.transformer.config.patch_size) * (
                width // self.vae_scale_factor // self.transformer.config.patch_size)
            scheduler_kwargs["mu"] = calculate_shift(
                image_seq_len,
                self.scheduler.config.get("base_image_seq_len", 256),
                self.scheduler.config.get("max_image_seq_len", 4096),
                self.scheduler.config.get("base_shift", 0.5),
                self.scheduler.config.get("max_shift", 1.16),
            )
        elif mu is not None:
            scheduler_kwargs["mu"] = mu
        return retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, **scheduler_kwargs)

    def decode_latents(self, latents):
        """Images ``[B, 3, H, W]`` in [0, 1]: the VAE's decoding of the (shifted, scaled) latents."""
        latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
        image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)

    def _output(self, latents, output_type, return_dict):
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

    # -- weakened text conditions (ERG's C-ERG) ------------------------------------------------------
    def _text_encoders(self) -> list:
        return [e for e in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if e is not None]

    def _named_text_encoders(self, names: tuple[str, ...] | None) -> list:
        """The text encoders C-ERG weakens, by name (None: every loaded one); a named encoder that is not
        loaded is an error."""
        if names is None:
            return self._text_encoders()
        loaded = dict(zip(TEXT_ENCODERS, (self.text_encoder, self.text_encoder_2, self.text_encoder_3)))
        missing = [n for n in names if loaded[n] is None]
        if missing:
            raise ValueError(f"ERG `text_encoders` names {missing}, but this pipeline was loaded without them "
                             f"(loaded: {[n for n, e in loaded.items() if e is not None]}).")
        return [loaded[n] for n in names]

    def _check_weak_text_inputs(self, weak_texts: list[TextWeakening], prompt, negative_prompt,
                                negative_prompt_embeds) -> None:
        if not weak_texts:
            return
        if not self._text_encoders():
            raise ValueError("ERG `text_tau` (C-ERG) re-encodes the prompt with weakened text encoders, but this "
                             "pipeline was loaded without text encoders.")
        for w in weak_texts:
            self._named_text_encoders(w.encoders)
        if any(w.source == "cond" for w in weak_texts) and prompt is None:
            raise ValueError("ERG `text_tau` (C-ERG) re-encodes the prompt with weakened text encoders: pass "
                             "`prompt` (text), not only `prompt_embeds`.")
        if any(w.source == "uncond" for w in weak_texts) and negative_prompt is None \
                and negative_prompt_embeds is not None:
            raise ValueError("ERG `text_tau` with condition='uncond' re-encodes the negative prompt: pass "
                             "`negative_prompt` (text), not only `negative_prompt_embeds`.")

    def _encode_weakened(self, w: TextWeakening, batch_size: int, prompts: tuple, negatives: tuple,
                         **encode_kwargs) -> TextCondition:
        """The ``w.source`` prompt encoded with the text encoders' queries scaled by ``w.tau`` in ``w.depth``."""
        if w.source == "cond":
            p1, p2, p3 = prompts
        else:  # the base pipeline's defaults for the negative prompts
            p1 = negatives[0] or ""
            p2, p3 = negatives[1] or p1, negatives[2] or p1
            p1, p2, p3 = ([p] * batch_size if isinstance(p, str) else p for p in (p1, p2, p3))
        with scaled_queries(self._named_text_encoders(w.encoders), w.tau, w.depth):
            embeds, _, pooled, _ = self.encode_prompt(prompt=p1, prompt_2=p2, prompt_3=p3,
                                                      do_classifier_free_guidance=False, **encode_kwargs)
        return TextCondition(embeds, pooled)
