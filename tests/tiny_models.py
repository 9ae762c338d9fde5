"""Tiny, randomly initialised diffusers models built in-process (no hub, no network).

Recipes: docs/verification.md section 1. DiT's zero-initialised output and adaLN layers
are re-randomised so that predictions and attention maps are non-trivial.
"""

from __future__ import annotations

import math

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)


def randomize_(model: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Re-initialise every parameter: weights ~ N(0, gain^2 / fan_in), biases ~ N(0, 0.02^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(fan_in))
            elif "norm" in name and "weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model


def tiny_sd3_transformer(num_layers: int = 6, seed: int = 0, qk_norm: str | None = None, sample_size: int = 8,
                         in_channels: int = 4, dual_attention_layers: tuple[int, ...] = ()) -> SD3Transformer2DModel:
    """``qk_norm="rms_norm"``: SD3.5-shaped; with ``dual_attention_layers``: SD3.5-Medium-shaped (those
    blocks also have ``attn2``, a self-attention over the image tokens)."""
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=in_channels, num_layers=num_layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=8, out_channels=in_channels, pos_embed_max_size=16, qk_norm=qk_norm,
        dual_attention_layers=tuple(dual_attention_layers),
    )
    return randomize_(model, seed, gain=1.0).eval()


def tiny_vae(latent_channels: int = 4, seed: int = 0, sd3: bool = True) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
        scaling_factor=1.5305 if sd3 else 0.18215, shift_factor=0.0609 if sd3 else None,
    ).eval()


def tiny_sd3_pipeline(num_layers: int = 6, seed: int = 0, qk_norm: str | None = None) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(num_layers, seed, qk_norm),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(4, seed),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None,
    )


def sd3_embeds(batch: int = 1, seed: int = 1, tokens: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(batch, tokens, 16, generator=g),
        negative_prompt_embeds=torch.randn(batch, tokens, 16, generator=g),
        pooled_prompt_embeds=torch.randn(batch, 8, generator=g),
        negative_pooled_prompt_embeds=torch.randn(batch, 8, generator=g),
    )


def sd3_latents(batch: int = 1, seed: int = 2, size: int = 8, channels: int = 4) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def tiny_dit_transformer(num_layers: int = 6, seed: int = 0, sample_size: int = 8) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=num_layers,
        sample_size=sample_size, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
    )
    return randomize_(model, seed, gain=1.0).eval()


def make_bounded_(model: DiTTransformer2DModel, seed: int = 0, block_gain: float = 1.0) -> DiTTransformer2DModel:
    """Re-weight a tiny DiT so that its epsilon prediction is ~ ``x_t`` plus the blocks' contributions.

    A random DiT predicts epsilon unrelated to ``x_t``; over an ancestral DDPM trajectory its x0 estimates
    (divided by ``sqrt(abar)`` ~ 0.006 at t = 999) grow the latents to hundreds, and a guidance term then
    moves the result by ~1e-5 of its range: a comparison at float tolerance could not see it fail. Here
    the patch embedding is an orthonormal map, the output head its transpose (for the 4 epsilon channels;
    small random weights for the variance ones), the final adaLN and LayerNorm are neutral and the blocks'
    residual gates are scaled by ``block_gain`` (1: as randomised), so trajectories stay bounded and guidance moves them
    visibly, while every block still changes the prediction.
    """
    g = torch.Generator().manual_seed(10_000 + seed)
    p = model.config.patch_size
    c_in, c_out = model.config.in_channels, model.config.out_channels
    width = model.config.num_attention_heads * model.config.attention_head_dim
    n_in = c_in * p * p
    with torch.no_grad():
        basis, _ = torch.linalg.qr(torch.randn(width, n_in, generator=g, dtype=torch.float64))
        basis = basis.float()  # [width, c_in * p * p], orthonormal columns
        model.pos_embed.proj.weight.copy_(basis.view(width, c_in, p, p))
        model.pos_embed.proj.bias.zero_()
        model.pos_embed.pos_embed.mul_(0.3)
        for block in model.transformer_blocks:
            block.norm1.linear.weight.mul_(block_gain)
            block.norm1.linear.bias.mul_(block_gain)
        model.proj_out_1.weight.zero_()
        model.proj_out_1.bias.zero_()
        head = torch.randn(p * p * c_out, width, generator=g) * 0.3 / math.sqrt(width)  # variance channels
        for c in range(c_in):  # output row (py, px, c) reads the embedding column (c, py, px)
            for py in range(p):
                for px in range(p):
                    head[(py * p + px) * c_out + c] = basis[:, (c * p + py) * p + px]
        model.proj_out_2.weight.copy_(head)
        model.proj_out_2.bias.zero_()
    model.norm_out = torch.nn.Identity()
    return model


def tiny_dit_pipeline(num_layers: int = 6, seed: int = 0, scheduler=None, bounded: bool = False) -> DiTPipeline:
    """``bounded=True``: :func:`make_bounded_` (stable 250-step DDPM trajectories, guidance visible)."""
    transformer = tiny_dit_transformer(num_layers, seed)
    if bounded:
        make_bounded_(transformer, seed)
    return DiTPipeline(
        transformer=transformer,
        vae=tiny_vae(4, seed, sd3=False),
        scheduler=scheduler or DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                             clip_sample=False),
        id2label={i: f"class{i}" for i in range(10)},
    )


def dit_latents(batch: int = 2, seed: int = 3, size: int = 8) -> torch.Tensor:
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))


def _bytes_to_unicode() -> list[str]:
    """The byte -> printable-unicode table of GPT-2/CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer(folder, max_length: int = 16):
    """A CLIP tokenizer with a hand-written byte-level vocabulary (one token per byte, no merges)."""
    import json
    import os

    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    for ch in chars:
        vocab.setdefault(ch + "</w>", len(vocab))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         model_max_length=max_length, pad_token="<|endoftext|>")


def tiny_clip_text_encoder(seed: int, vocab_size: int, max_length: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=max_length, projection_dim=4, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_sd3_text_pipeline(folder, num_layers: int = 6, seed: int = 0) -> StableDiffusion3Pipeline:
    """A tiny SD3 pipeline with real (tiny) CLIP tokenizers and text encoders; no T5 (zeros, as diffusers does)."""
    import os

    tok = tiny_clip_tokenizer(os.path.join(str(folder), "_tok"))
    tok2 = tiny_clip_tokenizer(os.path.join(str(folder), "_tok2"))
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(num_layers, seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(4, seed),
        text_encoder=tiny_clip_text_encoder(seed + 1, len(tok)), tokenizer=tok,
        text_encoder_2=tiny_clip_text_encoder(seed + 2, len(tok2)), tokenizer_2=tok2,
        text_encoder_3=None, tokenizer_3=None,
    )


def tiny_flux_transformer(num_layers: int = 3, num_single_layers: int = 4, seed: int = 0,
                          guidance_embeds: bool = True) -> FluxTransformer2DModel:
    """Flux-shaped: ``num_layers`` double blocks, ``num_single_layers`` single blocks, QK-norm, RoPE over
    (2, 2, 4) axes, 4 latent channels packed 2 x 2 (16 input features), a guidance embedding (dev-like)."""
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
        guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    )
    return randomize_(model, seed, gain=1.0).eval()


def tiny_flux_pipeline(seed: int = 0, cls=FluxPipeline, **shape) -> FluxPipeline:
    pipe = cls(transformer=tiny_flux_transformer(seed=seed, **shape), scheduler=FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True), vae=tiny_vae(4, seed), text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_embeds(batch: int = 1, seed: int = 1, tokens: int = 5) -> dict[str, torch.Tensor]:
    e = sd3_embeds(batch, seed, tokens)
    return e


def flux_latents(batch: int = 1, seed: int = 2, size: int = 8) -> torch.Tensor:
    """Packed ``[B, (size/2)^2, 16]`` latents of a ``size x size`` 4-channel latent (a 4 size px image)."""
    x = sd3_latents(batch, seed, size, 4)
    return x.view(batch, 4, size // 2, 2, size // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, (size // 2) ** 2, 16)


def tiny_pixart_transformer(num_layers: int = 6, seed: int = 0, sample_size: int = 8) -> PixArtTransformer2DModel:
    """PixArt-Σ-shaped: self-attention ``attn1``, cross-attention ``attn2`` to 16-wide captions, learned
    variance (8 output channels), adaLN-single."""
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=num_layers,
        cross_attention_dim=16, caption_channels=16, sample_size=sample_size, patch_size=2,
    )
    return randomize_(model, seed, gain=1.0).eval()


def tiny_pixart_pipeline(seed: int = 0, cls=PixArtSigmaPipeline, num_layers: int = 6):
    from diffusers import DPMSolverMultistepScheduler

    pipe = cls(transformer=tiny_pixart_transformer(num_layers, seed), scheduler=DPMSolverMultistepScheduler(),
               vae=tiny_vae(4, seed, sd3=False), text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_embeds(batch: int = 1, seed: int = 1, tokens: int = 6, padded: int = 2) -> dict[str, torch.Tensor]:
    """Caption embeddings with masks whose last ``padded`` tokens are padding."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[:, tokens - padded:] = 0
    return dict(prompt_embeds=torch.randn(batch, tokens, 16, generator=g), prompt_attention_mask=mask,
                negative_prompt_embeds=torch.randn(batch, tokens, 16, generator=g),
                negative_prompt_attention_mask=mask.clone())


def tiny_sana_transformer(num_layers: int = 6, seed: int = 0, sample_size: int = 8, qk_norm: str | None = None):
    """Sana-shaped: linear self-attention ``attn1`` (ReLU kernels), softmax cross-attention ``attn2`` to
    16-wide captions, patch size 1, a convolutional feed-forward."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    model = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=num_layers,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        mlp_ratio=2.5, sample_size=sample_size, patch_size=1, qk_norm=qk_norm,
    )
    return randomize_(model, seed, gain=1.0).eval()


def tiny_dc_vae(seed: int = 0):
    """A tiny DC-AE (Sana's autoencoder): 4 latent channels, x2 spatial compression."""
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    return AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=8, encoder_block_types=("ResBlock", "ResBlock"),
        decoder_block_types=("ResBlock", "ResBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()), upsample_block_type="interpolate",
        downsample_block_type="Conv", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    ).eval()


def tiny_sana_pipeline(seed: int = 0, cls=None, num_layers: int = 6, qk_norm: str | None = None):
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    cls = cls or SanaPipeline
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = cls(transformer=tiny_sana_transformer(num_layers, seed, qk_norm=qk_norm), scheduler=scheduler,
               vae=tiny_dc_vae(seed), text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_transformer(num_layers: int = 6, seed: int = 0):
    """Wan-2.1-shaped: 3-D patches (1, 2, 2), 3-D RoPE, RMS QK-norm across heads, self-attention ``attn1``,
    cross-attention ``attn2`` to 16-wide text embeddings."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    return randomize_(model, seed, gain=1.0).eval()


def tiny_wan_pipeline(seed: int = 0, cls=None, num_layers: int = 6):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    cls = cls or WanPipeline
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4).eval()  # x8 spatial, x4 temporal, as Wan's
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = cls(transformer=tiny_wan_transformer(num_layers, seed), scheduler=scheduler, vae=vae, text_encoder=None,
               tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_t5(folder, seed: int = 0, d_model: int = 16):
    """A T5 tokenizer from a sentencepiece model trained in memory on a few sentences, and a 1-layer T5
    encoder of width ``d_model``."""
    import io
    import os

    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    sentences = ["a photo of a cat", "a red apple on a table", "the quick brown fox jumps over the lazy dog"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=40, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
                                   minloglevel=2)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(str(folder), "spiece.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    tok = T5Tokenizer(vocab_file=path, extra_ids=0, model_max_length=32)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=64, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return tok, T5EncoderModel(config).eval()


def tiny_flux_text_pipeline(folder, seed: int = 0) -> FluxPipeline:
    """A tiny Flux pipeline with real (tiny) CLIP and T5 tokenizers and encoders."""
    import os

    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_clip_tokenizer(os.path.join(str(folder), "_tok"))
    torch.manual_seed(seed + 1)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    tok2, t5 = tiny_t5(os.path.join(str(folder), "_t5"), seed + 2)
    return FluxPipeline(transformer=tiny_flux_transformer(seed=seed), scheduler=FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True), vae=tiny_vae(4, seed), text_encoder=clip, tokenizer=tok,
        text_encoder_2=t5, tokenizer_2=tok2)


def tiny_pixart_text_pipeline(folder, seed: int = 0, sample_size: int = 32):
    """A tiny PixArt-Σ pipeline with a real (tiny) T5 tokenizer and encoder; ``sample_size`` 32 has
    diffusers' 256 px resolution bins."""
    import os

    from diffusers import DPMSolverMultistepScheduler

    tok, t5 = tiny_t5(os.path.join(str(folder), "_t5"), seed + 1)
    return PixArtSigmaPipeline(transformer=tiny_pixart_transformer(6, seed, sample_size=sample_size),
                               scheduler=DPMSolverMultistepScheduler(), vae=tiny_vae(4, seed, sd3=False),
                               text_encoder=t5, tokenizer=tok)


def tiny_wan_text_pipeline(folder, seed: int = 0):
    """A tiny Wan 2.1 pipeline with a real (tiny) T5 tokenizer and encoder (umT5's interface)."""
    import os

    pipe = tiny_wan_pipeline(seed)
    tok, t5 = tiny_t5(os.path.join(str(folder), "_t5"), seed + 1)
    pipe.register_modules(text_encoder=t5, tokenizer=tok)
    return pipe
