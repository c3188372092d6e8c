"""The bundled miniature pipelines and the `softrepa toy pretrain` that makes them.

The committed assets must be ordinary diffusers folders: stock `from_pretrained` of the
pipeline class (and of `DiffusionPipeline`) loads them and they generate 32x32 images on a CPU.
The training path must encode prompts exactly as the stock pipeline does (so a model trained
here is right at sampling time), and the CLI must run end to end on a tiny budget.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import softrepa
from softrepa.toy.pretrain import FOLDERS

ASSETS = Path(softrepa.__file__).resolve().parent / "assets"


def _generate(pipe, n: int = 2) -> list:
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle on the left", "a blue square above a yellow triangle"][:n]
    return pipe(prompts, num_inference_steps=2, guidance_scale=4.0, height=32, width=32,
                generator=torch.Generator().manual_seed(0)).images


def _check_images(images, n: int) -> None:
    assert len(images) == n
    for im in images:
        assert im.size == (32, 32)
        a = np.asarray(im)
        assert a.shape == (32, 32, 3) and np.isfinite(a).all()


@pytest.mark.parametrize("backbone", ["sd3", "sd15"])
def test_committed_assets_load_with_stock_from_pretrained(backbone):
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

    path = ASSETS / FOLDERS[backbone]
    cls = StableDiffusion3Pipeline if backbone == "sd3" else StableDiffusionPipeline
    pipe = cls.from_pretrained(path)
    _check_images(_generate(pipe), 2)
    # The generic loader resolves the same class from model_index.json.
    generic = DiffusionPipeline.from_pretrained(path)
    assert type(generic) is cls
    assert generic.vae.config.latent_channels == 4
    if backbone == "sd3":
        assert len(generic.transformer.transformer_blocks) >= 6
        # T5 is a null stand-in: all of its parameters are zero, so it adds exactly nothing.
        assert not any(p.any() for p in generic.text_encoder_3.parameters())
        # Defaults give 32x32 images: the transformer's sample_size is the 8x8 latent.
        assert generic.default_sample_size * generic.vae_scale_factor == 32
    else:
        assert generic.safety_checker is None
        assert generic.unet.config.sample_size * generic.vae_scale_factor == 32


def test_collapsed_null_tokens_equal_k_zero_tokens():
    """One zero token with +log(k) on its logit == the k zero 'T5' tokens the pipeline appends."""
    from softrepa.toy.pretrain_sd3 import CollapsedNullAttnProcessor, build_sd3_components

    tr = build_sd3_components(seed=3, layers=6)["transformer"].eval()
    # Random non-zero output layers: the zero-initialised AdaLN-out of a fresh DiT would hide errors.
    torch.manual_seed(1)
    for p in tr.parameters():
        p.data.normal_(0, 0.2)
    g = torch.Generator().manual_seed(0)
    dim = tr.config.joint_attention_dim
    x = torch.randn(3, 4, 8, 8, generator=g)
    ctx = torch.randn(3, 9, dim, generator=g)
    pooled = torch.randn(3, tr.config.pooled_projection_dim, generator=g)
    t = torch.tensor([10.0, 500.0, 990.0])
    ks = [1, 7, 256]
    with torch.no_grad():
        ref = torch.cat([tr(x[i:i + 1], torch.cat([ctx[i:i + 1], torch.zeros(1, k, dim)], 1), pooled[i:i + 1],
                            t[i:i + 1]).sample for i, k in enumerate(ks)])
        proc = CollapsedNullAttnProcessor()
        tr.set_attn_processor(proc)
        proc.log_k = torch.tensor([math.log(k) for k in ks])
        out = tr(x, torch.cat([ctx, torch.zeros(3, 1, dim)], 1), pooled, t).sample
        proc.log_k = torch.zeros(3)  # a single zero token: not the same model input as 256 of them
        one = tr(x, torch.cat([ctx, torch.zeros(3, 1, dim)], 1), pooled, t).sample
    assert ref.abs().max() > 1e-2 and (one[2] - ref[2]).abs().max() > 1e-2
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))


def test_training_text_path_matches_stock_encode_prompt():
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    from softrepa.toy.pretrain_common import TokenCache
    from softrepa.toy.pretrain_sd3 import sd3_text_context

    prompts = ["a green circle to the left of a red square", ""]
    pipe = StableDiffusion3Pipeline.from_pretrained(ASSETS / FOLDERS["sd3"])
    with torch.no_grad():
        emb, _, pooled, _ = pipe.encode_prompt(prompts, prompts, None, do_classifier_free_guidance=False,
                                               max_sequence_length=5)
        ids = TokenCache(pipe.tokenizer)(prompts)
        ctx, pooled_train = sd3_text_context(pipe.text_encoder, pipe.text_encoder_2, ids)
    n = ctx.shape[1]
    torch.testing.assert_close(emb[:, :n], ctx)
    assert emb.shape[1] == n + 5 and not emb[:, n:].any()  # the zero "T5" tokens
    torch.testing.assert_close(pooled, pooled_train)

    pipe15 = StableDiffusionPipeline.from_pretrained(ASSETS / FOLDERS["sd15"])
    with torch.no_grad():
        emb15, _ = pipe15.encode_prompt(prompts, "cpu", 1, False)
        train15 = pipe15.text_encoder(TokenCache(pipe15.tokenizer)(prompts))[0]
    torch.testing.assert_close(emb15, train15)


def test_pretrain_cli_end_to_end_tiny_budget(tmp_path, capsys):
    from diffusers import DiffusionPipeline

    from softrepa.cli import main

    rc = main(["toy", "pretrain", "--backbone", "both", "--out", str(tmp_path), "--steps", "3",
               "--vae-steps", "3", "--images", "64", "--seed", "1", "--batch-size", "4",
               "--text-steps", "2", "--snapshots", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "VAE round trip" in out and "total" in out
    for backbone in ("sd3", "sd15"):
        folder = tmp_path / FOLDERS[backbone]
        assert (folder / "model_index.json").exists() and (folder / "pretrain.json").exists()
        assert not list(folder.rglob("*.bin")), "weights must be safetensors"
        _check_images(_generate(DiffusionPipeline.from_pretrained(folder), 1), 1)
    # the SD3 snapshot is an ordinary pipeline folder too; text pretraining is recorded
    _check_images(_generate(DiffusionPipeline.from_pretrained(tmp_path / "toy_sd3_step2"), 1), 1)
    record = __import__("json").loads((tmp_path / FOLDERS["sd3"] / "pretrain.json").read_text())
    assert record["train"]["text_encoders"]["steps"] == 2
