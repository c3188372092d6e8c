"""Stock SD3 / SD1.5 / SDXL pipelines with tokens attached, what is specific to them: both CFG branches
carry the m extra tokens, the checkpointing flag leaves generation as it is, the empty-prompt init.
Tokens change the images, vanilla after removal and `load_into`: tests/test_conformance.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import softrepa
from softrepa import SoftTokens, SoftTokensConfig, attach
from softrepa.tiny import tiny_sd15_pipeline
from tests.conformance import variant

BUILDERS = {"sd3": variant("sd3").build, "sd15": variant("sd15").build, "sdxl": variant("sdxl").build}


def _generate(pipe, ckpt=False):
    out = pipe(["a red circle", "a blue square"], num_inference_steps=3, guidance_scale=4.0,
               height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(0))
    return out.images


def _randomize(tokens, std=1.0):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in tokens.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return tokens


@pytest.mark.parametrize("family", ["sd3", "sd15", "sdxl"])
def test_both_cfg_branches_carry_the_tokens_and_checkpointing_leaves_generation(family):
    pipe = BUILDERS[family]()
    pipe.set_progress_bar_config(disable=True)
    tokens = _randomize(SoftTokens.for_model(pipe, SoftTokensConfig()))
    seen = []
    denoiser = softrepa.family.resolve_denoiser(pipe)
    with attach(pipe, tokens):
        blk = denoiser.transformer_blocks[0] if family == "sd3" else denoiser.mid_block

        def record(mod, args, kwargs):
            ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            seen.append(tuple(ehs.shape))

        rec = blk.register_forward_pre_hook(record, with_kwargs=True)
        with_tokens = _generate(pipe)
        rec.remove()
        # The pipeline must still run with the model's checkpointing flag on. diffusers only
        # checkpoints when grad is enabled (pipelines run under no_grad), so this equality is
        # about the flag not breaking the hooks; the checkpointed *gradient* path is compared
        # with the plain one in test_conformance.py.
        denoiser.enable_gradient_checkpointing()
        with_ckpt = _generate(pipe)
        denoiser.disable_gradient_checkpointing()
    np.testing.assert_array_equal(with_tokens, with_ckpt)
    # both CFG branches (2 prompts x {uncond, cond}) receive the m extra tokens
    assert seen and all(s[0] == 4 for s in seen)


def test_tokens_length_on_both_branches_sd3():
    pipe = BUILDERS["sd3"]()
    pipe.set_progress_bar_config(disable=True)
    lengths = []
    blk = pipe.transformer.transformer_blocks[0]
    with attach(pipe, SoftTokens.for_model(pipe)):
        h = blk.register_forward_pre_hook(lambda m, a, k: lengths.append(k["encoder_hidden_states"].shape[1]),
                                          with_kwargs=True)
        _generate(pipe)
        h.remove()
    plain = []
    h = blk.register_forward_pre_hook(lambda m, a, k: plain.append(k["encoder_hidden_states"].shape[1]),
                                      with_kwargs=True)
    _generate(pipe)
    h.remove()
    assert all(a == b + 4 for a, b in zip(lengths, plain))


def test_empty_prompt_init_sd15():
    pipe = tiny_sd15_pipeline()
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(init="empty_prompt"))
    emb = pipe.encode_prompt([""], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    assert torch.allclose(tokens.base[0], emb[0, 0].expand(4, -1))


def test_assets_prefix_names_the_bundled_miniatures():
    """Packaged recipes say `model: "@assets/toy_sd3"`, so they work from any directory."""
    from pathlib import Path

    from softrepa.pipeline import resolve_model_path

    path = Path(resolve_model_path("@assets/toy_sd3"))
    assert path.is_absolute() and (path / "model_index.json").is_file()
    assert resolve_model_path("stabilityai/stable-diffusion-3-medium-diffusers") == (
        "stabilityai/stable-diffusion-3-medium-diffusers")
    with pytest.raises(FileNotFoundError, match="no bundled pipeline"):
        resolve_model_path("@assets/nope")
