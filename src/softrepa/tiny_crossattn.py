"""Tiny cross-attention DiT pipelines built from configs: SANA and Wan (text-to-video).

Like `softrepa.tiny`, nothing here downloads anything: every model is built from a config with
random weights, every tokenizer from a character vocabulary generated in memory. The pipelines are
the stock diffusers classes (`SanaPipeline`, `WanPipeline`), so they save with `save_pretrained` and
load back with the stock `from_pretrained`. Kept apart from `tiny.py` so that each module stays
short; the builders are used by the tests, the conformance suite and the benchmarks.
"""

from __future__ import annotations

import string

import torch

from .tiny import make_t5_tokenizer

#: characters the tiny Gemma tokenizer knows (anything else is `<unk>`); whitespace separates words
_CHARS = string.ascii_letters + string.digits + ".,;:!?'\"-()/<>[]{}_*#&%+=@"


def make_gemma_tokenizer(model_max_length: int = 4096):
    """A character-level `PreTrainedTokenizerFast` with Gemma's special tokens (pad 0, eos 1, bos 2)
    that prepends `<bos>` as Gemma's tokenizer does (SANA's prompt selection keeps position 0 as BOS).

    Args:
        model_max_length: maximum sequence length (SANA's complex human instruction is long).

    Example:
        >>> make_gemma_tokenizer()("a red circle").input_ids[0]   # <bos> first, as Gemma's tokenizer
        2
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in _CHARS:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                        special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=model_max_length)


def tiny_dc_ae(latent_channels: int = 4, seed: int = 0):
    """A tiny `AutoencoderDC` (SANA's deep-compression autoencoder): three levels, spatial factor 4."""
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    return AutoencoderDC(
        in_channels=3, latent_channels=latent_channels, attention_head_dim=8,
        encoder_block_types="ResBlock", decoder_block_types="ResBlock",
        encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), ()), decoder_qkv_multiscales=((), (), ()),
        scaling_factor=0.41407,
    ).eval()


def tiny_sana_pipeline(*, num_layers: int = 2, qk_norm: str | None = None, seed: int = 0):
    """A complete tiny `SanaPipeline`: a 2-layer, width-32 `Gemma2Model` text encoder with a character
    tokenizer, a factor-4 `AutoencoderDC`, a width-32 `SanaTransformer2DModel` (linear self-attention,
    cross-attention to the caption, 2 heads x 16) and a flow-prediction DPM-Solver++ scheduler.

    Args:
        num_layers: transformer blocks.
        qk_norm: SANA 1.5's query / key RMS norm ("rms_norm_across_heads") or None (SANA 1.0).
        seed: weights seed.

    Example:
        >>> pipe = tiny_sana_pipeline()
        >>> pipe("a red circle", height=32, width=32, num_inference_steps=2, max_sequence_length=16,
        ...      use_resolution_binning=False).images[0].size
        (32, 32)
    """
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tok = make_gemma_tokenizer()
    torch.manual_seed(seed + 1)
    te = Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  query_pre_attn_scalar=16, max_position_embeddings=4096,
                                  pad_token_id=0, eos_token_id=1, bos_token_id=2)).eval()
    vae = tiny_dc_ae(seed=seed + 4)
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=num_layers,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
        mlp_ratio=2.0, sample_size=32, patch_size=1, qk_norm=qk_norm,
    ).eval()
    # SANA's sampler: DPM-Solver++ on flow sigmas with a resolution shift
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return SanaPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=transformer, scheduler=scheduler)


def tiny_wan_vae(seed: int = 0):
    """A tiny `AutoencoderKLWan`: 4 latent channels, spatial factor 4, temporal factor 2."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                            latents_std=[1.5, 2.0, 1.2, 2.5], scale_factor_temporal=2,
                            scale_factor_spatial=4).eval()


def tiny_wan_transformer(num_layers: int = 2, seed: int = 0):
    """A tiny `WanTransformer3DModel`: width 32 (2 heads x 16), text width 32, patches (1, 2, 2)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                 out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=num_layers,
                                 rope_max_seq_len=64).eval()


def tiny_wan_pipeline(*, num_layers: int = 2, two_experts: bool = False, expand_timesteps: bool = False,
                      seed: int = 0):
    """A complete tiny `WanPipeline` (text-to-video).

    Args:
        num_layers: blocks of each transformer.
        two_experts: Wan 2.2 A14B: a second transformer (`transformer_2`, other weights) for the
            low-noise steps, switched at `boundary_ratio` 0.875 (the A14B T2V pipeline's value).
        expand_timesteps: Wan 2.2 TI2V: the pipeline hands the transformer one timestep per latent token.
        seed: weights seed.

    Example:
        >>> pipe = tiny_wan_pipeline(two_experts=True)
        >>> pipe("a red circle", height=32, width=32, num_frames=5, num_inference_steps=2,
        ...      max_sequence_length=16).frames.shape   # (videos, frames, H, W, 3)
        (1, 5, 32, 32, 3)
    """
    from diffusers import UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    tok = make_t5_tokenizer(512)
    torch.manual_seed(seed + 1)
    te = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=1,
                                     num_heads=2, relative_attention_num_buckets=8)).eval()
    transformer = tiny_wan_transformer(num_layers, seed)
    transformer_2 = tiny_wan_transformer(num_layers, seed + 7) if two_experts else None
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=tok, text_encoder=te, vae=tiny_wan_vae(seed + 4), transformer=transformer,
                       scheduler=scheduler, transformer_2=transformer_2,
                       boundary_ratio=0.875 if two_experts else None, expand_timesteps=expand_timesteps)


__all__ = ["make_gemma_tokenizer", "tiny_dc_ae", "tiny_sana_pipeline", "tiny_wan_pipeline", "tiny_wan_transformer",
           "tiny_wan_vae"]
