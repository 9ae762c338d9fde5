"""DiTEMAGPipeline: diffusers' DiT pipeline with guidance terms (EMAG and the others), initial
latents, callbacks and the sampler row layouts.

The call prepares DiT's inputs (class ids with names resolved, the null class for the unconditional
branch, latents, the DDPM/DDIM schedule) and runs its sampler loop; the guidance terms' passes and
combination are the engine's (:mod:`emag.engine`), EMAG's DiT protocol its own (docs/method.md).

Sampler row layouts: ``"doubled"`` steps ``[x ; x]`` with noise drawn for 2B rows and keeps the first
half (diffusers' DiTPipeline and the original DiT CFG sampler; used by plain CFG and by the additive
reference mode); ``"samples"`` steps the B samples only (the EMAG reference's cond/uncond modes).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor

from .._warnings import warn
from ..families import DIT
from ..guidance.call import call_defaults, given_terms, terms_of_call
from ..guidance.call import noise_layout as term_noise_layout
from ..guidance.emag import EMAG
from ..inputs import (
    check_count,
    check_generator,
    check_guidance_scale,
    check_latents,
    check_options,
    check_output_type,
    class_ids,
)
from ..plumbing.conditions import ClassCondition
from ..plumbing.exclusive import one_call_at_a_time
from ._guided import GuidedPipeline, vp_contexts

NOISE_LAYOUTS = ("doubled", "samples")


class DiTEMAGPipeline(GuidedPipeline, DiTPipeline):
    r"""Class-conditional DiT with Exponential Moving Average Guidance.

    Accepts every argument of :class:`diffusers.DiTPipeline` plus ``latents`` (initial noise),
    ``callback_on_step_end``, ``emag`` and ``noise_layout``. With ``emag=None`` it reproduces
    ``DiTPipeline`` exactly (plain CFG on all noise channels, doubled row layout). ``output_type``
    also accepts ``"latent"``. After a call, ``self.emag_trace`` lists what EMAG did at each step.
    ``class_labels`` takes class ids ``0..N-1``, class names from the model's ``id2label`` (as
    ``get_label_ids``), or ``N`` (``pipe.null_class``), the null class the model was trained with, for
    unconditional samples.

    With EMAG (``emag=`` or an :class:`~emag.EMAG` in ``guidance``) the defaults are the reference's
    (docs/method.md): ``guidance_scale=1.5``, ``num_inference_steps=250``, the combination on the first 3
    latent channels, and for ``combination="additive"`` the doubled noise layout; without EMAG they are
    diffusers' (4.0, 50 steps). EMAG's reference sampler is ancestral DDPM with learned-range variance:
    ``pipe.scheduler = emag.dit_reference_scheduler()`` (a warning says so when another one is set).
    ``combine_space="x0"`` combines every guidance term in x0 space (default ``"auto"``: only when an
    active term, e.g. APG, asks for it); affine combinations (CFG, PAG, EMAG, ...) give the same result.
    """

    family = DIT
    _callback_tensor_inputs = ["latents"]
    _optional_components = ["vae"]  # None for pixel-space models: outputs are the samples themselves

    def __init__(
        self,
        transformer: DiTTransformer2DModel,
        vae: AutoencoderKL | None,
        scheduler: KarrasDiffusionSchedulers,
        id2label: dict | None = None,
    ):
        super().__init__(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
        # DiTPipeline does not save id2label; registering it keeps it in model_index.json.
        self.register_to_config(id2label=id2label)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """Wrap an existing DiT pipeline, keeping its class names (DiTPipeline does not store id2label)."""
        if "id2label" not in kwargs and getattr(pipeline, "labels", None):
            id2label: dict[int, list[str]] = {}
            for name, idx in pipeline.labels.items():
                id2label.setdefault(int(idx), []).append(name)
            kwargs["id2label"] = {i: ", ".join(names) for i, names in sorted(id2label.items())}
        return super().from_pipe(pipeline, **kwargs)

    @property
    def null_class(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm or 1000)

    def _is_reference_sampler(self) -> bool:
        return type(self.scheduler).__name__ == "DDPMScheduler" and self._uses_learned_variance()

    def _uses_learned_variance(self) -> bool:
        return getattr(self.scheduler.config, "variance_type", None) in ("learned", "learned_range")

    @one_call_at_a_time  # one call per transformer at a time; hooks act in the calling thread only
    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int],
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        emag: EMAG | None = None,
        noise_layout: str | None = None,
        guidance: list | None = None,
        batching: str = "normal",
        fast: bool = True,
        combine_space: str = "auto",
        on_step_outputs: Callable | None = None,
    ) -> ImagePipelineOutput | tuple:
        self.emag_trace = None
        given = given_terms(guidance, emag)
        defaults = call_defaults(given, self.family)  # EMAG: the reference's CFG 1.5 and 250 steps
        if guidance_scale is None:  # diffusers' 4.0 otherwise
            guidance_scale = defaults.get("guidance_scale", 4.0)
        if num_inference_steps is None:  # diffusers' 50 otherwise
            num_inference_steps = defaults.get("num_inference_steps", 50)
        ids = self._check_call(class_labels, guidance_scale, num_inference_steps, generator, latents, output_type,
                               batching, fast, combine_space)
        terms = terms_of_call(guidance, emag, guidance_scale, self.family)
        self._check_sampler(given, defaults.get("reference_sampler"))
        if noise_layout is None:  # diffusers' DiT CFG and the reference's additive EMAG: the doubled batch
            noise_layout = term_noise_layout(terms, guidance is None and emag is None and guidance_scale > 1)
        if noise_layout not in NOISE_LAYOUTS:
            raise ValueError(f"Unknown noise_layout {noise_layout!r}; expected one of {NOISE_LAYOUTS}.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        for k in callback_on_step_end_tensor_inputs:
            if k not in self._callback_tensor_inputs:
                raise ValueError(f"callback tensor input {k!r} is not available; choose from {self._callback_tensor_inputs}.")
        device = self._execution_device
        labels = torch.tensor(ids, dtype=torch.long, device=device)
        batch_size = labels.shape[0]
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        setup = self._guided_setup(terms, guidance_scale, num_steps=len(timesteps), batch_size=batch_size,
                                   device=device, fast=fast)
        runtimes = self._guided_runtimes(terms, setup, vp_contexts(self.scheduler, timesteps))
        step_kwargs = {}
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["generator"] = generator
            if isinstance(generator, list) and noise_layout == "doubled":
                raise ValueError("A list of generators (one per sample) needs noise_layout='samples'.")

        # -- inputs ---------------------------------------------------------------------------------
        channels, size = self.transformer.config.in_channels, self.transformer.config.sample_size
        if latents is None:
            latents = randn_tensor((batch_size, channels, size, size), generator=generator, device=device,
                                   dtype=self.transformer.dtype)
        else:
            latents = latents.to(device=device, dtype=self.transformer.dtype)
        conditions = {"cond": ClassCondition(labels)}
        if setup.uses_uncond:
            conditions["uncond"] = ClassCondition(torch.full_like(labels, self.null_class))
        engine = self._guided_engine(terms, runtimes, conditions, setup, batching, combine_space, observer=on_step_outputs,
                                     scheduler=self.scheduler)

        # -- the sampler loop -------------------------------------------------------------------------
        contexts = vp_contexts(self.scheduler, timesteps)
        with engine.installed():
            for i, t in enumerate(self.progress_bar(timesteps)):
                out = engine.predict(latents, t, contexts[i])
                if not self._uses_learned_variance() and out.shape[1] == 2 * channels:
                    out = out[:, :channels]
                if noise_layout == "doubled":
                    stepped = self.scheduler.step(torch.cat([out, out]), t, torch.cat([latents, latents]),
                                                  **step_kwargs).prev_sample
                    latents = stepped[:batch_size]
                else:
                    latents = self.scheduler.step(out, t, latents, **step_kwargs).prev_sample
                if callback_on_step_end is not None:
                    outputs = callback_on_step_end(self, i, t, {"latents": latents})
                    latents = outputs.pop("latents", latents)
        self._record(runtimes)
        return self._output(latents, output_type, return_dict)

    def _check_sampler(self, terms, reference: str | None) -> None:
        """A term whose published numbers on DiT-XL/2-shaped models used a particular sampler warns when
        another scheduler is set."""
        imagenet_dit = self.null_class == 1000 and self.transformer.config.in_channels == 4  # DiT-XL/2's shape
        if reference and imagenet_dit and not self._is_reference_sampler():
            names = ", ".join(sorted({type(t).__name__ for t in terms if t.call_defaults(self.family)}))
            warn(f"{names}'s published DiT numbers were sampled with {reference}; this pipeline's scheduler is "
                 f"{type(self.scheduler).__name__}. Set `pipe.scheduler = emag.dit_reference_scheduler()` to "
                 "sample as the reference.")

    def decode_latents(self, latents):
        """Images ``[B, C, H, W]`` in [0, 1]: the VAE's decoding, or the pixels of a pixel-space model."""
        if self.vae is not None:
            samples = self.vae.decode(1 / self.vae.config.scaling_factor * latents).sample
        else:  # pixel-space model: the samples are images in [-1, 1]
            samples = latents
        return (samples / 2 + 0.5).clamp(0, 1)

    def _output(self, latents, output_type, return_dict):
        if output_type == "latent":
            samples = latents
        else:
            samples = self.decode_latents(latents)
            if output_type != "pt":
                samples = samples.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    samples = self.numpy_to_pil(samples)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (samples,)
        return ImagePipelineOutput(images=samples)

    def _check_call(self, class_labels, guidance_scale, num_inference_steps, generator, latents, output_type,
                    batching, fast, combine_space) -> list[int]:
        """The call's arguments checked before any model pass; returns the class ids (names resolved)."""
        check_guidance_scale(guidance_scale)
        check_count("num_inference_steps", num_inference_steps, "the number of sampling steps")
        check_output_type(output_type)
        check_options(batching, combine_space, fast)
        ids = class_ids(class_labels, getattr(self, "labels", None), self.null_class)
        check_generator(generator, len(ids), f"{len(ids)} class label(s)")
        size = self.transformer.config.sample_size
        check_latents(latents, (len(ids), self.transformer.config.in_channels, size, size),
                      f"{len(ids)} class label(s), {self.transformer.config.in_channels} latent channels, "
                      f"sample size {size}")
        return ids
