"""Straightforward reference implementations of Algorithm 1, written as plain loops.

They call the stock sub-modules one by one (no hooks involved) and must only be run on models
that carry no tokens.
"""

from __future__ import annotations

import torch


def ref_tokens(tokens, set_index: int, timestep: torch.Tensor, projection=None) -> torch.Tensor:
    """(B, m, D): base (through `projection` if given) + time[bucket(t_b)] for each sample b."""
    base = tokens.base[set_index]
    if projection is not None:
        base = projection(base)
    rows = []
    for t in timestep.reshape(-1).tolist():
        s = base
        if tokens.time is not None:
            bucket = min(max(int(t) * tokens.layout.time_buckets // 1000, 0), tokens.layout.time_buckets - 1)
            s = s + tokens.time[bucket, set_index]
        rows.append(s)
    return torch.stack(rows)


def ref_mmdit_forward(model, tokens, hidden_states, encoder_hidden_states, pooled_projections, timestep):
    """SD3Transformer2DModel forward with soft tokens, as a loop over transformer_blocks."""
    lay = tokens.layout
    proj = model.context_embedder if lay.token_space == "text" else None
    height, width = hidden_states.shape[-2:]
    hs = model.pos_embed(hidden_states)
    temb = model.time_text_embed(timestep, pooled_projections)
    ehs = model.context_embedder(encoder_hidden_states)
    n_txt = ehs.shape[1]
    for k, block in enumerate(model.transformer_blocks):
        ehs = ehs[:, -n_txt:]  # drop the previous layer's soft tokens
        if k in lay.layers:
            s = ref_tokens(tokens, lay.layers.index(k), timestep, proj)
            ehs = torch.cat([s, ehs], dim=1)
        ehs, hs = block(hidden_states=hs, encoder_hidden_states=ehs, temb=temb)
    hs = model.proj_out(model.norm_out(hs, temb))
    p = model.config.patch_size
    h, w = height // p, width // p
    hs = hs.reshape(hs.shape[0], h, w, p, p, model.out_channels)
    hs = torch.einsum("nhwpqc->nchpwq", hs)
    return hs.reshape(hs.shape[0], model.out_channels, h * p, w * p)


def ref_unet_forward(model, tokens, sample, timestep, encoder_hidden_states, added_cond_kwargs=None,
                     rows=None, blocks=None):
    """UNet2DConditionModel forward (plain SD1.5 / SDXL configs) with a hand-built context per group.
    `rows` (B, m, D) and `blocks` replace `tokens` (then None) when a caller computes the tokens itself."""
    s = rows if rows is not None else ref_tokens(tokens, 0, timestep.expand(sample.shape[0]))
    blocks = blocks if blocks is not None else tokens.layout.blocks
    ctx_tok = torch.cat([encoder_hidden_states[:, :1], s, encoder_hidden_states[:, 1:]], dim=1)

    def ctx(group):
        return ctx_tok if group in blocks else encoder_hidden_states

    t_emb = model.get_time_embed(sample=sample, timestep=timestep)
    emb = model.time_embedding(t_emb, None)
    aug = model.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs=added_cond_kwargs or {})
    if aug is not None:
        emb = emb + aug
    x = model.conv_in(sample)
    res = (x,)
    for blk in model.down_blocks:
        if getattr(blk, "has_cross_attention", False):
            x, r = blk(hidden_states=x, temb=emb, encoder_hidden_states=ctx("down"))
        else:
            x, r = blk(hidden_states=x, temb=emb)
        res += r
    x = model.mid_block(x, emb, encoder_hidden_states=ctx("mid"))
    for blk in model.up_blocks:
        r = res[-len(blk.resnets):]
        res = res[: -len(blk.resnets)]
        if getattr(blk, "has_cross_attention", False):
            x = blk(hidden_states=x, temb=emb, res_hidden_states_tuple=r, encoder_hidden_states=ctx("up"))
        else:
            x = blk(hidden_states=x, temb=emb, res_hidden_states_tuple=r)
    x = model.conv_act(model.conv_norm_out(x))
    return model.conv_out(x)
