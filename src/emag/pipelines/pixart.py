"""PixArtSigmaEMAGPipeline: diffusers' PixArt-Σ pipeline with guidance terms (EMAG and the others).

The call prepares PixArt's inputs (T5 encodings with their padding masks, latents, the schedule, the
resolution binning) and runs its sampler loop; the guidance terms' passes and combination are the
engine's. The learned-variance channels of the prediction are dropped as diffusers' pipeline does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import PixArtSigmaPipeline
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN, retrieve_timesteps
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from ..families.pixart import PIXART
from ..guidance.call import terms_of_call, text_weakenings
from ..guidance.emag import EMAG
from ..inputs import warn_unused_negative
from ..plumbing.conditions import TextCondition
from ..plumbing.exclusive import one_call_at_a_time
from ._guided import GuidedPipeline, base_arguments, vp_contexts

BINS = {256: ASPECT_RATIO_2048_BIN, 128: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_256_BIN}


class PixArtSigmaEMAGPipeline(GuidedPipeline, PixArtSigmaPipeline):
    r"""PixArt-Σ with Exponential Moving Average Guidance and the other guidance terms.

    Accepts every argument of :class:`diffusers.PixArtSigmaPipeline` plus ``emag`` (an :class:`emag.EMAG`,
    paired with ``CFG(guidance_scale)``) or ``guidance`` (a list of terms). With neither the call is
    exactly the base pipeline's. ``batching``, ``fast``, ``combine_space`` and ``on_step_outputs`` as in
    :class:`emag.StableDiffusion3EMAGPipeline`.
    """

    family = PIXART

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
        height: int | None = None,
        width: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        callback_steps: int = 1,
        clean_caption: bool = True,
        use_resolution_binning: bool = True,
        max_sequence_length: int = 300,
        emag: EMAG | None = None,
        guidance: list | None = None,
        batching: str = "normal",
        fast: bool = True,
        combine_space: str = "auto",
        on_step_outputs: Callable | None = None,
        **kwargs,
    ) -> ImagePipelineOutput | tuple:
        base_args = base_arguments(locals())
        base_args.update(kwargs)
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
            raise NotImplementedError("ERG's text_tau (C-ERG) re-encodes the prompt with weakened CLIP/T5 encoders; it "
                                      "is implemented for SD3 only. Use ERG's attention part (layers) on PixArt.")
        height = height or self.transformer.config.sample_size * self.vae_scale_factor
        width = width or self.transformer.config.sample_size * self.vae_scale_factor
        orig_size = (height, width)
        if use_resolution_binning:
            height, width = binned_size(self, BINS, height, width)
        self.check_inputs(prompt, height, width, negative_prompt, callback_steps, prompt_embeds,
                          negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask)
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if isinstance(prompt, list) else prompt_embeds.shape[0]
        device = self._execution_device
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps,
                                                            sigmas)
        contexts = vp_contexts(self.scheduler, timesteps)
        setup = self._guided_setup(terms, guidance_scale, num_steps=len(timesteps),
                                   batch_size=batch_size * num_images_per_prompt, device=device, fast=fast)
        warn_unused_negative(setup.uses_uncond, {k: v for k, v in base_args.items() if k != "negative_prompt"})
        runtimes = self._guided_runtimes(terms, setup, contexts)

        # -- inputs ---------------------------------------------------------------------------------
        if negative_prompt is None and negative_prompt_embeds is None:
            negative_prompt = ""  # the base pipeline's default (a caller may pass None for "none given")
        embeds, mask, n_embeds, n_mask = self.encode_prompt(
            prompt, setup.uses_uncond, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
            device=device, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            prompt_attention_mask=prompt_attention_mask, negative_prompt_attention_mask=negative_prompt_attention_mask,
            clean_caption=clean_caption, max_sequence_length=max_sequence_length)
        conditions = {"cond": TextCondition(embeds, None, mask)}
        if setup.uses_uncond:
            conditions["uncond"] = TextCondition(n_embeds, None, n_mask)
        channels = self.transformer.config.in_channels
        latents = self.prepare_latents(batch_size * num_images_per_prompt, channels, height, width, embeds.dtype,
                                       device, generator, latents)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        engine = self._guided_engine(terms, runtimes, conditions, setup, batching, combine_space,
                                     observer=on_step_outputs, scheduler=self.scheduler)

        # -- the sampler loop ------------------------------------------------------------------------
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        with engine.installed(), self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                out = engine.predict(latents, t, contexts[i])
                if self.transformer.config.out_channels // 2 == channels:
                    out = out[:, :channels]  # the learned variance is not used by the sampler
                latents = self.scheduler.step(out, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
                    if callback is not None and i % callback_steps == 0:
                        callback(i // getattr(self.scheduler, "order", 1), t, latents)
        self._record(runtimes)
        image = binned_output(self, latents, output_type, orig_size if use_resolution_binning else None)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def decode_latents(self, latents):
        """Images ``[B, 3, H, W]`` in [0, 1] from latents (or x0 predictions)."""
        return (decoded(self, latents) / 2 + 0.5).clamp(0, 1)


def binned_size(pipe, bins: dict, height: int, width: int) -> tuple[int, int]:
    """The size diffusers' PixArt / Sana pipelines generate at for a requested size: the nearest bin of
    the transformer's native size (a sample size without bins is an error naming the way out)."""
    size = pipe.transformer.config.sample_size
    if size not in bins:
        raise ValueError(f"Resolution binning needs a transformer sample_size of {sorted(bins)}, this one has "
                         f"{size}: pass use_resolution_binning=False.")
    return pipe.image_processor.classify_height_width_bin(height, width, ratios=bins[size])


def decoded(pipe, latents):
    """The VAE's [-1, 1] images of (scaled) latents."""
    return pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]


def binned_output(pipe, latents, output_type: str, orig_size: tuple[int, int] | None):
    """The call's output as diffusers' PixArt / Sana pipelines give it: the latents, or the decoded images
    resized back to the requested size (``orig_size``, when binned) and post-processed."""
    if output_type == "latent":
        return latents
    image = decoded(pipe, latents)
    if orig_size is not None:
        image = pipe.image_processor.resize_and_crop_tensor(image, orig_size[1], orig_size[0])
    return pipe.image_processor.postprocess(image, output_type=output_type)
