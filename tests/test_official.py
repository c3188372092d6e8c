"""`import-official`: the authors' released .pth files convert to tokens with their exact forward."""

from __future__ import annotations

import contextlib

import pytest
import torch

import softrepa
from softrepa import SoftTokensError, attach
from softrepa.cli import main
from softrepa.official import convert_official, load_official_tensor
from tests.conftest import mmdit_inputs, unet_inputs
from tests.reference import ref_unet_forward


@contextlib.contextmanager
def saved_as_cuda():
    """Make torch.save tag CPU storages as 'cuda:0', as files saved on a GPU are."""
    reg = torch.serialization._package_registry
    entry = (0, lambda obj: "cuda:0" if obj.device.type == "cpu" else None, lambda obj, loc: None)
    reg.insert(0, entry)
    try:
        yield
    finally:
        reg.remove(entry)


def authors_bucket(timestep: torch.Tensor) -> torch.Tensor:
    """The authors' rule: int32 truncation, shift the whole batch by one if any t >= 1000, // 10."""
    t = timestep.type(torch.int32)
    if torch.sum(t >= 1000) > 0:
        t = t - 1
    return t // 10


def authors_mmdit_forward(model, dc_tokens, dc_t: torch.nn.Embedding, n_layers, inp):
    """The authors' Algorithm 1 loop with their raw tensors (their transformer.py semantics)."""
    from tests.reference import ref_mmdit_forward  # noqa: F401  (same stock sub-modules)

    hs = model.pos_embed(inp["hidden_states"])
    temb = model.time_text_embed(inp["timestep"], inp["pooled_projections"])
    ehs = model.context_embedder(inp["encoder_hidden_states"])
    dctemb = dc_t(authors_bucket(inp["timestep"])).chunk(n_layers, dim=-1)
    n = ehs.shape[1]
    for k, block in enumerate(model.transformer_blocks):
        ehs = ehs[:, -n:]
        if k < n_layers:
            dc1 = dc_tokens[k].expand(ehs.shape[0], -1, -1)
            if dc1.shape[-1] == model.config.joint_attention_dim:
                dc1 = model.context_embedder(dc1)
            ehs = torch.cat([dc1 + dctemb[k].unsqueeze(1), ehs], dim=1)
        ehs, hs = block(hidden_states=hs, encoder_hidden_states=ehs, temb=temb)
    hs = model.proj_out(model.norm_out(hs, temb))
    p, c = model.config.patch_size, model.out_channels
    h, w = inp["hidden_states"].shape[-2] // p, inp["hidden_states"].shape[-1] // p
    hs = torch.einsum("nhwpqc->nchpwq", hs.reshape(hs.shape[0], h, w, p, p, c))
    return hs.reshape(hs.shape[0], c, h * p, w * p)


@pytest.mark.parametrize("space", ["text", "block"])
@pytest.mark.parametrize("timesteps", [[1000.0] * 3, [640.2] * 3, [999.0, 503.7, 9.0]])
def test_sd3_import_reproduces_authors_forward(tmp_path, sd3_model, space, timesteps):
    cfg = sd3_model.config
    L, m = 5, 4
    width = cfg.joint_attention_dim if space == "text" else cfg.caption_projection_dim
    torch.manual_seed(0)
    dc = torch.nn.Parameter(torch.randn(L, m, width) * 0.3)
    emb = torch.nn.Embedding(100, cfg.caption_projection_dim * L)
    torch.nn.init.normal_(emb.weight, std=0.3)
    with saved_as_cuda():
        torch.save(dc, tmp_path / "dc_tokens.pth")
        torch.save(emb, tmp_path / "dc_t_tokens.pth")
    with pytest.raises(RuntimeError):  # really tagged as CUDA: a plain load fails on a CPU machine
        torch.load(tmp_path / "dc_t_tokens.pth", weights_only=False)
    out = tmp_path / "sd3.safetensors"
    assert main(["import-official", "--family", "sd3", "--dc-tokens", str(tmp_path / "dc_tokens.pth"),
                 "--dc-t-tokens", str(tmp_path / "dc_t_tokens.pth"), "--layers", "5",
                 "--out", str(out)]) == 0
    inp = mmdit_inputs(sd3_model, timesteps=timesteps)
    with torch.no_grad():
        ref = authors_mmdit_forward(sd3_model, dc.detach(), emb, L, inp)
        with softrepa.load_into(sd3_model, out):
            got = sd3_model(**inp).sample
    assert (got - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_unet_import_reproduces_authors_forward(tmp_path, family):
    from softrepa.tiny import tiny_unet

    model = tiny_unet(sdxl=family == "sdxl")
    width = model.config.cross_attention_dim
    torch.manual_seed(0)
    dc = torch.randn(4, width) * 0.3
    torch.save(dc, tmp_path / "dc_tokens.pth")
    args = ["import-official", "--family", family, "--dc-tokens", str(tmp_path / "dc_tokens.pth"),
            "--out", str(tmp_path / "t.safetensors")]
    emb = None
    if family == "sd15":
        emb = torch.nn.Embedding(100, width)
        torch.nn.init.normal_(emb.weight, std=0.3)
        with saved_as_cuda():
            torch.save(emb, tmp_path / "dc_t_tokens.pth")
        args += ["--dc-t-tokens", str(tmp_path / "dc_t_tokens.pth")]
    assert main(args) == 0
    inp = unet_inputs(model, timesteps=[700, 700, 700])
    tokens = softrepa.load_soft_tokens(tmp_path / "t.safetensors")
    assert tokens.layout.blocks == ("down",)  # the authors' scripts: --apply_dc True False False
    # authors: [BOS, dc_tokens + dc_t(int(t)//10), rest] in the down blocks
    s = dc + (emb.weight[70] if emb is not None else 0)
    assert torch.allclose(tokens(torch.tensor([700.0]), 1)[0, 0], s, atol=1e-6)
    with torch.no_grad():
        ref = ref_unet_forward(model, tokens, **inp)
        with attach(model, tokens):
            got = model(**inp).sample
    assert (got - ref).abs().max() <= 1e-5


def test_released_shapes_convert(tmp_path):
    """The released files' shapes: SD3 (5, 4, 4096) + Embedding(100, 1536*5); SD1.5; SDXL."""
    sd3 = convert_official("sd3", torch.zeros(5, 4, 4096), torch.zeros(100, 1536 * 5))
    assert (sd3.layout.token_space, sd3.layout.model_dim, sd3.layout.layers) == ("text", 1536, (0, 1, 2, 3, 4))
    sd3b = convert_official("sd3", torch.zeros(5, 4, 1536), torch.zeros(100, 1536 * 5))
    assert sd3b.layout.token_space == "block"
    sd15 = convert_official("sd15", torch.zeros(4, 768), torch.zeros(100, 768), blocks=("down",))
    assert sd15.layout.blocks == ("down",) and sd15.time.shape == (100, 1, 768)
    sdxl = convert_official("sdxl", torch.zeros(4, 2048))
    assert sdxl.time is None and sdxl.base.shape == (1, 4, 2048)
    softrepa.save_soft_tokens(sd3, tmp_path / "x")
    assert softrepa.load_soft_tokens(tmp_path / "x.safetensors").layout == sd3.layout


def test_bad_official_files(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"payload": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(SoftTokensError, match="weights-only") as info:
        load_official_tensor(tmp_path / "evil.pth", "dc_tokens")
    assert "\x1b[" not in str(info.value)  # no terminal colour codes from torch's message
    torch.save(torch.nn.Linear(2, 2), tmp_path / "linear.pth")  # a module outside the allow-list
    with pytest.raises(SoftTokensError, match=r"global torch\.nn\.modules\.linear\.Linear, which is not allowed.*Only tensors") as info:
        load_official_tensor(tmp_path / "linear.pth", "dc_t_tokens")
    assert "\x1b[" not in str(info.value)
    with pytest.raises(SoftTokensError, match="no such file"):
        load_official_tensor(tmp_path / "nope.pth", "dc_tokens")
    with pytest.raises(SoftTokensError, match="--layers 3"):
        convert_official("sd3", torch.zeros(5, 4, 64), layers=3)
    with pytest.raises(SoftTokensError, match="dc_t_tokens"):
        convert_official("sd3", torch.zeros(5, 4, 64), torch.zeros(100, 7))
    with pytest.raises(SoftTokensError, match="family"):
        convert_official("sd4", torch.zeros(5, 4, 64))
    assert main(["import-official", "--family", "sd15", "--dc-tokens", str(tmp_path / "nope.pth"),
                 "--out", str(tmp_path / "o.safetensors")]) == 2


# ----------------------------------------------------------------------------- AGSM's files
def agsm_mmdit_forward(model, soft, soft_t: torch.nn.Embedding, n_layers, neg, inp):
    """AGSM's SD3 wrapper (their transformer.py semantics): per row the policy `neg[b]` (0 = psi+,
    1 = psi-), tokens appended *after* the text, dropped again before the next block."""
    hs = model.pos_embed(inp["hidden_states"])
    temb = model.time_text_embed(inp["timestep"], inp["pooled_projections"])
    ehs = model.context_embedder(inp["encoder_hidden_states"])
    t_emb = soft_t(authors_bucket(inp["timestep"])).chunk(n_layers, dim=-1)
    n = ehs.shape[1]
    for k, block in enumerate(model.transformer_blocks):
        ehs = ehs[:, :n]
        if k < n_layers:
            base = soft[neg, k]  # (B, m, D)
            if base.shape[-1] == model.config.joint_attention_dim:
                base = model.context_embedder(base)
            ehs = torch.cat([ehs, base + t_emb[k].unsqueeze(1)], dim=1)
        ehs, hs = block(hidden_states=hs, encoder_hidden_states=ehs, temb=temb)
    hs = model.proj_out(model.norm_out(hs, temb))
    p, c = model.config.patch_size, model.out_channels
    h, w = inp["hidden_states"].shape[-2] // p, inp["hidden_states"].shape[-1] // p
    hs = torch.einsum("nhwpqc->nchpwq", hs.reshape(hs.shape[0], h, w, p, p, c))
    return hs.reshape(hs.shape[0], c, h * p, w * p)


@pytest.mark.parametrize("timesteps", [[1000.0] * 3, [640.2, 503.7, 9.0]])
def test_agsm_sd3_import_reproduces_the_official_forward_for_both_policies(tmp_path, sd3_model, timesteps):
    cfg = sd3_model.config
    L, m = 3, 4
    torch.manual_seed(0)
    soft = torch.nn.Parameter(torch.randn(2, L, m, cfg.caption_projection_dim) * 0.3)
    emb = torch.nn.Embedding(100, cfg.caption_projection_dim * L)
    torch.nn.init.normal_(emb.weight, std=0.3)
    with saved_as_cuda():
        torch.save(soft, tmp_path / "soft_tokens.pth")
        torch.save(emb, tmp_path / "soft_t_tokens.pth")
    out = tmp_path / "agsm.safetensors"
    assert main(["import-official", "--method", "agsm", "--family", "sd3", "--soft-tokens",
                 str(tmp_path / "soft_tokens.pth"), "--soft-t-tokens", str(tmp_path / "soft_t_tokens.pth"),
                 "--out", str(out)]) == 0
    assert softrepa.token_sets_of(out) == ["positive", "negative"]
    inp = mmdit_inputs(sd3_model, timesteps=timesteps)
    neg = torch.tensor([0, 1, 1])  # rows 1, 2 under psi- (as the unconditional rows of --uncon2neg)
    with torch.no_grad():
        ref = agsm_mmdit_forward(sd3_model, soft.detach(), emb, L, neg, inp)
        ref_pos = agsm_mmdit_forward(sd3_model, soft.detach(), emb, L, torch.zeros(3, dtype=torch.long), inp)
        with softrepa.load_into(sd3_model, out) as handle:  # default: psi+ everywhere
            assert (sd3_model(**inp).sample - ref_pos).abs().max() <= 1e-5
        with softrepa.load_into(sd3_model, out, uncond_tokens="negative") as handle:
            with handle.uncond_rows(neg.bool()):
                got = sd3_model(**inp).sample
    assert (got - ref).abs().max() <= 1e-5
    assert (ref - ref_pos)[1:].abs().max() > 1e-3  # psi- really differs where it applies


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_agsm_unet_import_reproduces_the_official_forward(tmp_path, family):
    from softrepa.tiny import tiny_unet
    from tests.reference import ref_unet_forward

    model = tiny_unet(sdxl=family == "sdxl")
    width = model.config.cross_attention_dim
    torch.manual_seed(0)
    soft = torch.randn(2, 4, width) * 0.3
    emb = torch.nn.Embedding(100, width)
    torch.nn.init.normal_(emb.weight, std=0.3)
    torch.save(soft, tmp_path / "soft_tokens.pth")
    torch.save(emb, tmp_path / "soft_t_tokens.pth")
    out = tmp_path / "t.safetensors"
    assert main(["import-official", "--method", "agsm", "--family", family, "--soft-tokens",
                 str(tmp_path / "soft_tokens.pth"), "--soft-t-tokens", str(tmp_path / "soft_t_tokens.pth"),
                 "--out", str(out)]) == 0
    assert softrepa.load_soft_tokens(out).layout.blocks == ("down", "mid")  # AGSM's apply_soft_tokens default
    inp = unet_inputs(model, timesteps=[700, 700, 700])
    neg = torch.tensor([1, 0, 1])
    # AGSM: [BOS, soft[neg_b] + soft_t(int(t)//10), rest] in the down and mid blocks
    rows = soft[neg] + emb.weight[70].detach()
    with torch.no_grad():
        ref = ref_unet_forward(model, None, **inp, rows=rows, blocks=("down", "mid"))
        with softrepa.load_into(model, out, uncond_tokens="negative") as handle:
            with handle.uncond_rows(neg.bool()):
                got = model(**inp).sample
    assert (got - ref).abs().max() <= 1e-5


def test_agsm_import_errors(tmp_path):
    torch.save(torch.zeros(5, 4, 1536), tmp_path / "one_policy.pth")
    with pytest.raises(SoftTokensError, match=r"must have shape \(2, L, m, D\) \(psi\+, psi-\), got \(5, 4, 1536\)"):
        softrepa.official.import_official("sd3", tmp_path / "one_policy.pth", None, tmp_path / "x", method="agsm")
    args = ["import-official", "--method", "agsm", "--family", "sd3", "--out", str(tmp_path / "y.safetensors")]
    assert main(args) == 2  # no --soft-tokens
    assert main(args + ["--soft-tokens", str(tmp_path / "one_policy.pth"), "--dc-t-tokens", "x.pth"]) == 2
    assert not (tmp_path / "y.safetensors").exists()
