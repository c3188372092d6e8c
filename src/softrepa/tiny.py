"""Tiny diffusers components built from configs, for tests, benchmarks and the miniature.

Nothing here downloads weights: every model is built from a config with random weights and
every tokenizer from a character-level vocabulary generated in memory. The real-weight paths
(`from_pretrained(hub_id_or_dir)`) stay in the rest of the library; the components built here
are ordinary diffusers / transformers objects and can be saved with `save_pretrained` and loaded
back with the stock `from_pretrained`.
"""

from __future__ import annotations

import string
from typing import Any

import torch

#: Characters the tiny tokenizer knows; anything else maps to the unknown token.
_TOKENIZER_CHARS = string.ascii_lowercase + string.digits + " .,;:!?'-()"


def make_clip_tokenizer(model_max_length: int = 32):
    """A character-level `CLIPTokenizer` (BPE with no merges) built without any download.

    Args:
        model_max_length: maximum sequence length, BOS and EOS included.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _TOKENIZER_CHARS.replace(" ", ""):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def make_t5_tokenizer(model_max_length: int = 32):
    """A tiny unigram `T5TokenizerFast` with a character vocabulary (no download)."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(ch, -2.0) for ch in _TOKENIZER_CHARS if ch != " "]
    vocab += [("\u2581" + ch, -1.5) for ch in _TOKENIZER_CHARS if ch != " "]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _clip_text_encoder(hidden: int, layers: int, vocab_size: int, max_len: int, seed: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 16),
        max_position_embeddings=max_len,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(cfg).eval()


def tiny_vae(latent_channels: int = 4, block_channels: tuple[int, ...] = (16, 32), seed: int = 0, **kw: Any):
    """A tiny `AutoencoderKL` (downsampling factor 2 ** (len(block_channels) - 1))."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(block_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=block_channels,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        **kw,
    ).eval()


def tiny_sd3_transformer(
    num_layers: int = 4,
    *,
    joint_attention_dim: int = 64,
    caption_projection_dim: int = 32,
    pooled_projection_dim: int = 64,
    in_channels: int = 16,
    qk_norm: str | None = None,
    dual_attention_layers: tuple[int, ...] = (),
    sample_size: int = 16,
    seed: int = 0,
):
    """A tiny `SD3Transformer2DModel` (SD3-medium layout; `qk_norm` / dual attention as SD3.5)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    heads = 2
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=in_channels,
        num_layers=num_layers,
        attention_head_dim=caption_projection_dim // heads,
        num_attention_heads=heads,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=caption_projection_dim,
        pooled_projection_dim=pooled_projection_dim,
        out_channels=in_channels,
        pos_embed_max_size=max(32, sample_size),
        qk_norm=qk_norm,
        dual_attention_layers=dual_attention_layers,
    ).eval()


def tiny_unet(
    *,
    cross_attention_dim: int = 32,
    sdxl: bool = False,
    pooled_dim: int = 16,
    block_channels: tuple[int, ...] = (32, 64),
    sample_size: int = 8,
    in_channels: int = 4,
    seed: int = 0,
):
    """A tiny `UNet2DConditionModel` in the SD1.5 layout, or SDXL's (text_time conditioning)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    n = len(block_channels)
    kw: dict[str, Any] = {}
    if sdxl:
        kw = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=pooled_dim + 6 * 8,
            transformer_layers_per_block=(1,) * n,
            use_linear_projection=True,
        )
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=block_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        **kw,
    ).eval()


def tiny_sd3_pipeline(num_layers: int = 4, *, with_t5: bool = False, seed: int = 0, **transformer_kw: Any):
    """A complete tiny `StableDiffusion3Pipeline` (two CLIP encoders, optional T5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tok = make_clip_tokenizer(77)
    te1 = _clip_text_encoder(32, 2, len(tok), 77, seed + 1, True)
    te2 = _clip_text_encoder(32, 2, len(tok), 77, seed + 2, True)
    te3 = tok3 = None
    if with_t5:
        from transformers import T5Config, T5EncoderModel

        tok3 = make_t5_tokenizer(77)
        torch.manual_seed(seed + 3)
        te3 = T5EncoderModel(
            T5Config(vocab_size=len(tok3), d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=2)
        ).eval()
    transformer = tiny_sd3_transformer(num_layers, seed=seed, **transformer_kw)
    vae = tiny_vae(latent_channels=transformer.config.in_channels, seed=seed + 4,
                   shift_factor=0.0609, scaling_factor=1.5035)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=te1,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=make_clip_tokenizer(77),
        text_encoder_3=te3,
        tokenizer_3=tok3,
    )


def tiny_flux_pipeline(*, guidance_embeds: bool = False, num_layers: int = 2, num_single_layers: int = 1,
                       seed: int = 0):
    """A complete tiny `FluxPipeline`: schnell-style (no guidance embedding) or, with
    `guidance_embeds=True`, dev-style (guidance-distilled)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tok = make_clip_tokenizer(77)
    te1 = _clip_text_encoder(32, 2, len(tok), 77, seed + 1, False)  # FLUX reads CLIP's pooled output
    tok2 = make_t5_tokenizer(77)
    torch.manual_seed(seed + 2)
    te2 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=32, d_kv=16, d_ff=64, num_layers=1,
                                  num_heads=2)).eval()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    ).eval()
    # 4 latent channels, packed 2 x 2 into the transformer's 16
    vae = tiny_vae(latent_channels=4, seed=seed + 4, shift_factor=0.1159, scaling_factor=0.3611)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=te1, tokenizer=tok,
                        text_encoder_2=te2, tokenizer_2=tok2, transformer=transformer)


def tiny_sd15_pipeline(seed: int = 0):
    """A complete tiny `StableDiffusionPipeline` (no safety checker)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tok = make_clip_tokenizer(77)
    te = _clip_text_encoder(32, 2, len(tok), 77, seed + 1, False)
    return StableDiffusionPipeline(
        vae=tiny_vae(seed=seed + 4),
        text_encoder=te,
        tokenizer=tok,
        unet=tiny_unet(cross_attention_dim=32, seed=seed),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0):
    """A complete tiny `StableDiffusionXLPipeline` (two CLIP encoders, text_time conditioning)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tok = make_clip_tokenizer(77)
    te1 = _clip_text_encoder(16, 2, len(tok), 77, seed + 1, False)
    te2 = _clip_text_encoder(16, 2, len(tok), 77, seed + 2, True)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed=seed + 4),
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=make_clip_tokenizer(77),
        unet=tiny_unet(cross_attention_dim=32, sdxl=True, pooled_dim=16, seed=seed),
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    )


def make_chat_tokenizer(model_max_length: int = 512):
    """A character-level `PreTrainedTokenizerFast` with a Mistral-style chat template (no download), for
    pipelines that encode prompts through `apply_chat_template` (FLUX.2).

    The template renders the user turns only (`[INST]text[/INST]`): FLUX.2's pipeline prepends a long
    system message, which at the short lengths of tests would fill the whole context and cut the prompt.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in _TOKENIZER_CHARS.replace(" ", ""):
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST]"
                "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
                "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
                "{% endif %}[/INST]{% endif %}{% endfor %}")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", model_max_length=model_max_length)
    tok.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]"]})
    tok.chat_template = template
    return tok


def tiny_flux2_vae(seed: int = 4):
    """FLUX.2's VAE (`AutoencoderKLFlux2`, also FLUX.3's), tiny: factor 2, 4 latent channels, with latent
    batch-norm statistics as a trained VAE has them (identity at init), drawn after `torch.manual_seed(seed)`."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(block_out_channels=(16, 32), latent_channels=4, layers_per_block=1, norm_num_groups=8,
                             sample_size=32, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2).eval()
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.1 * torch.randn(vae.bn.num_features))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.num_features))
    return vae


def _tiny_flux2_parts(guidance_embeds: bool, num_layers: int, num_single_layers: int, seed: int):
    """The FLUX.2 transformer (text width 48), factor-2 VAE and scheduler both tiny FLUX.2 pipelines share."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
    ).eval()
    vae = tiny_flux2_vae(seed + 4)
    # dynamic shifting as FLUX.2-dev's scheduler (the pipeline computes mu itself)
    return transformer, vae, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)


def tiny_flux2_pipeline(*, guidance_embeds: bool = True, num_layers: int = 2, num_single_layers: int = 1,
                        seed: int = 0):
    """A complete tiny `Flux2Pipeline`: a 30-layer, 16-wide `Mistral3ForConditionalGeneration` (the
    pipeline stacks its hidden states 10, 20 and 30: text width 48), a chat-template tokenizer, a
    factor-2 `AutoencoderKLFlux2` with non-trivial latent batch-norm statistics, and a
    `Flux2Transformer2DModel` with (`guidance_embeds=True`, FLUX.2-dev) or without a guidance embedding."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    tok = make_chat_tokenizer()
    torch.manual_seed(seed + 1)
    text = MistralConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=30,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=32, patch_size=8, head_dim=8)
    te = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision,
                                                         image_token_index=len(tok) - 1)).eval()
    transformer, vae, scheduler = _tiny_flux2_parts(guidance_embeds, num_layers, num_single_layers, seed)
    return Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=tok, transformer=transformer)


def tiny_flux2_klein_pipeline(*, is_distilled: bool = False, num_layers: int = 2, num_single_layers: int = 1,
                              seed: int = 0):
    """A complete tiny `Flux2KleinPipeline` (FLUX.2 [klein]): a 27-layer, 16-wide `Qwen3ForCausalLM` (the
    pipeline stacks its hidden states 9, 18 and 27: text width 48), a byte-level Qwen tokenizer with a
    Qwen3-style chat template (`enable_thinking`), FLUX.2's factor-2 VAE and a `Flux2Transformer2DModel`
    without a guidance embedding. `is_distilled=False` is a base model the pipeline samples with true
    CFG; `True` a step-distilled one it samples without guidance."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = make_qwen2_tokenizer(model_max_length=512)
    tok.add_tokens(["<think>", "</think>"], special_tokens=True)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined "
                         "and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
    torch.manual_seed(seed + 1)
    te = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=27,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      max_position_embeddings=1024, pad_token_id=0)).eval()
    transformer, vae, scheduler = _tiny_flux2_parts(False, num_layers, num_single_layers, seed)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=tok, transformer=transformer,
                              is_distilled=is_distilled)


#: Words of the Qwen-Image prompt template. `QwenImagePipeline` drops the template's system part
#: after encoding (`prompt_template_encode_start_idx` = 34 tokens of the real Qwen2.5 tokenizer); the
#: tiny tokenizer merges these words whole, so that the same text is 34 tokens and is dropped too.
_QWEN_TEMPLATE_WORDS = ("system", "Describe", " the", " image", " by", " detailing", " color", " shape", " size",
                        " texture", " quantity", " text", " spatial", " relationships", " of", " objects", " and",
                        " background", "user", "assistant")


def make_qwen2_tokenizer(model_max_length: int = 1058):
    """A tiny byte-level BPE `Qwen2Tokenizer` built without any download: the 256 byte symbols,
    whole-word merges for the Qwen-Image prompt template and the chat tokens `<|im_start|>` /
    `<|im_end|>`; other text falls back to (mostly) single bytes.

    Args:
        model_max_length: maximum sequence length (the pipeline truncates at 1024 + 34 itself).
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab: dict[str, int] = {"<|endoftext|>": 0}
    for ch in sorted(ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _QWEN_TEMPLATE_WORDS:
        w = word.replace(" ", "\u0120")  # the byte-level symbol of a space
        for k in range(2, len(w) + 1):  # left-to-right prefix merges: the word ends as one token
            if w[:k] not in vocab:
                vocab[w[:k]] = len(vocab)
                merges.append((w[:k - 1], w[k - 1]))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    return tok


def tiny_qwenimage_pipeline(*, num_layers: int = 2, seed: int = 0):
    """A complete tiny `QwenImagePipeline` (random weights, built in well under a second).

    Text encoder: a `Qwen2_5_VLForConditionalGeneration` with a 2-layer, width-32 language model
    (multimodal rotary sections summing to head_dim / 2, as the real one) and a one-block vision
    tower the text-to-image pipeline never calls; tokenizer: `make_qwen2_tokenizer`. VAE: a 3-D
    `AutoencoderKLQwenImage` with 4 latent channels and spatial factor 4. Transformer: width 32
    (2 heads x 16, rotary axes 4 + 6 + 6), `num_layers` dual-stream blocks, 2 x 2 packed patches
    (in_channels 4 x 4). Scheduler: Qwen-Image's published configuration (dynamic exponential shift
    0.5 .. 0.9 over 256 .. 8192 tokens, shift_terminal 0.02). Sides must be multiples of 8.
    """
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = make_qwen2_tokenizer()
    torch.manual_seed(seed + 1)
    te_config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         bos_token_id=None, eos_token_id=0, pad_token_id=0),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=1, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(te_config).eval()
    torch.manual_seed(seed + 4)
    z = 4
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=z, dim_mult=[1, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, False],  # two spatial halvings: factor 4
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 1.2, 2.5]).eval()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z, out_channels=z, num_layers=num_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, use_dynamic_shifting=True, time_shift_type="exponential")
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                             transformer=transformer)
