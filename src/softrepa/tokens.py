"""Learnable soft text tokens (paper Sec. 3.2, Algorithm 1) and their validated configuration.

A `SoftTokens` module holds, for each *token set* (one per selected MM-DiT block; a single set
shared by the selected UNet block groups, as the authors do), `m` base tokens plus an optional
time-indexed offset:

    s(k, t) = P(base[k]) + time[bucket(t), k]        # (m, model_dim), time broadcast over m

where `P` is the identity when the base tokens live in the model's block width and the model's
own `context_embedder` when they live in the text-encoder space (MM-DiT, authors' training code).
The module is independent of any model: `attach()` plugs it into one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .checks import MAX_BUCKETS, MAX_SETS, MAX_TOKEN_PARAMS, MAX_TOKENS, MAX_WIDTH, finite, int_in
from .errors import SoftTokensError
from .registry import family_of, get_family, resolve_denoiser

TOKEN_SPACES = ("block", "text")
INITS = ("normal", "empty_prompt")


@dataclass
class SoftTokensConfig:
    """What a user chooses about the soft tokens (model-independent).

    Args:
        num_tokens: m, tokens per set (paper: 4 for SD3; the authors' scripts use 4 for SD1.5).
        num_layers: MM-DiT: use the first `num_layers` transformer blocks (paper: 5).
        layers: MM-DiT: explicit block indices; overrides `num_layers` when given.
        blocks: UNet: block groups that receive the tokens, from "down", "mid", "up"
            (default down + mid, the paper's text; the authors' SD1.5 scripts use down only,
            which recipes/sd15.yaml follows).
        time_buckets: number of timestep buckets of the time-indexed part on the 0..1000 scale
            (authors: 100, i.e. bucket = clamp(int(t) // 10, 0, 99)); 0 disables the time part.
        token_space: MM-DiT: "text" keeps base tokens in the text-encoder space
            (joint_attention_dim) and passes them through the model's `context_embedder`;
            "block" keeps them in the block width (caption_projection_dim). UNets: ignored.
        init: "normal" (N(0, init_std)) or "empty_prompt" (the BOS position of the model's
            empty-prompt embedding, repeated m times — the authors' SD1.5 initialisation).
        init_std: standard deviation of the normal initialisation (paper: 0.02).
    """

    num_tokens: int = 4
    num_layers: int = 5
    layers: tuple[int, ...] | None = None
    blocks: tuple[str, ...] = ("down", "mid")
    time_buckets: int = 100
    token_space: str = "text"
    init: str = "normal"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
        self.blocks = tuple(self.blocks)
        # bounded before anything is allocated (issue 26: num_tokens 100000000 was an 8 GB tensor)
        int_in(self.num_tokens, "num_tokens", 1, MAX_TOKENS, error=SoftTokensError)
        if self.layers is None:
            int_in(self.num_layers, "num_layers", 1, MAX_SETS, error=SoftTokensError)
        int_in(self.time_buckets, "time_buckets", 0, MAX_BUCKETS, error=SoftTokensError)
        finite(self.init_std, "init_std", above=0, error=SoftTokensError)
        if self.layers is not None:
            if not self.layers:
                raise SoftTokensError("layers must name at least one block index")
            if min(self.layers) < 0 or max(self.layers) >= MAX_SETS or len(set(self.layers)) != len(self.layers):
                raise SoftTokensError(f"layers must be distinct indices in 0..{MAX_SETS - 1}, got {list(self.layers)}")
        if not self.blocks or not all(isinstance(b, str) for b in self.blocks):
            # which names are valid is the family's business (UNets: down / mid / up), checked at layout_for
            raise SoftTokensError(f"blocks must be a non-empty list of block-group names, got {list(self.blocks)}")
        if self.time_buckets < 0:
            raise SoftTokensError(f"time_buckets must be >= 0, got {self.time_buckets}")
        if self.token_space not in TOKEN_SPACES:
            raise SoftTokensError(f"token_space must be one of {TOKEN_SPACES}, got {self.token_space!r}")
        if self.init not in INITS:
            raise SoftTokensError(f"init must be one of {INITS}, got {self.init!r}")
        if self.init_std <= 0:
            raise SoftTokensError(f"init_std must be > 0, got {self.init_std}")


@dataclass
class TokenLayout:
    """Everything needed to rebuild a `SoftTokens` and check it against a model (saved as JSON).

    Args:
        family: "sd3" (SD3 / SD3.5, MM-DiT), "sd15" or "sdxl" (UNet).
        token_dim: width of the stored base tokens.
        model_dim: width at which the tokens enter the model (MM-DiT block width or UNet
            cross_attention_dim); the time part lives here.
        num_tokens: m.
        time_buckets: 0 when there is no time part.
        token_space: "text" or "block" (MM-DiT); "block" for UNets.
        layers: MM-DiT block indices, one token set each; () for UNets.
        blocks: UNet block groups sharing the single token set; () for MM-DiT.
        model_depth: number of MM-DiT transformer blocks of the model the tokens were made for.
    """

    family: str
    token_dim: int
    model_dim: int
    num_tokens: int
    time_buckets: int = 100
    token_space: str = "block"
    layers: tuple[int, ...] = ()
    blocks: tuple[str, ...] = ()
    model_depth: int = 0

    def __post_init__(self) -> None:
        self.layers = tuple(int(i) for i in self.layers)
        self.blocks = tuple(self.blocks)
        family = get_family(self.family)  # unknown family: the error lists the known ones
        for name, hi in (("token_dim", MAX_WIDTH), ("model_dim", MAX_WIDTH), ("num_tokens", MAX_TOKENS),
                         ("time_buckets", MAX_BUCKETS)):
            int_in(getattr(self, name), name, 0 if name == "time_buckets" else 1, hi, error=SoftTokensError)
        if self.time_buckets < 0:
            raise SoftTokensError(f"time_buckets must be >= 0, got {self.time_buckets}")
        if self.token_space not in TOKEN_SPACES:
            raise SoftTokensError(f"token_space must be one of {TOKEN_SPACES}, got {self.token_space!r}")
        if len(self.layers) > MAX_SETS:
            raise SoftTokensError(f"layers: at most {MAX_SETS} token sets, got {len(self.layers)}")
        sets = max(1, len(self.layers))
        size = sets * self.num_tokens * self.token_dim + self.time_buckets * sets * self.model_dim
        if size > MAX_TOKEN_PARAMS:  # each field within its bound, the product still a gigabyte tensor
            raise SoftTokensError(f"this layout holds {size} parameters, above the limit of {MAX_TOKEN_PARAMS}")
        if bool(self.layers) == bool(self.blocks):
            raise SoftTokensError("a layout has either layers (one token set per block) or blocks (one set shared "
                                  f"by block groups), got layers={list(self.layers)}, blocks={list(self.blocks)}")
        if self.layers and self.model_depth and max(self.layers) >= self.model_depth:
            raise SoftTokensError(f"layers {list(self.layers)} go beyond the model depth {self.model_depth}")
        family.check_layout(self)

    @property
    def num_sets(self) -> int:
        """Token sets: one per selected block (`layers`); one shared by the block groups (`blocks`)."""
        return len(self.layers) if self.layers else 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"], d["blocks"] = list(self.layers), list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenLayout":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in d and f.default is dataclasses.MISSING]
        if missing:
            raise SoftTokensError(f"soft-token config lacks field(s) {missing}")
        return cls(**{k: v for k, v in d.items() if k in names})


def timestep_buckets(timestep: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Per-sample bucket index on the 0..1000 timestep scale.

    With 100 buckets this is `clamp(int(t) // 10, 0, 99)` (authors' rule; they shift the whole
    batch by one when any t >= 1000, which gives the same bucket whenever the batch shares t).

    Args:
        timestep: (B,) timesteps in [0, 1000] (float or int).
        num_buckets: number of buckets.
    Returns:
        (B,) long tensor.
    """
    t_int = timestep.detach().to(torch.float64).floor().long()  # int(t) for t >= 0
    return torch.clamp(t_int * num_buckets // 1000, 0, num_buckets - 1)


class SoftTokens(nn.Module):
    """The learnable soft tokens: `base` (num_sets, m, token_dim) and `time` (buckets, num_sets, model_dim).

    Args:
        layout: the validated `TokenLayout`.
        init_std: standard deviation of the N(0, std) initialisation of both parts.
    """

    def __init__(self, layout: TokenLayout, init_std: float = 0.02):
        super().__init__()
        self.layout = layout
        self.base = nn.Parameter(torch.randn(layout.num_sets, layout.num_tokens, layout.token_dim) * init_std)
        if layout.time_buckets > 0:
            self.time = nn.Parameter(torch.randn(layout.time_buckets, layout.num_sets, layout.model_dim) * init_std)
        else:
            self.register_parameter("time", None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_model(
        cls,
        model: Any,
        config: SoftTokensConfig | None = None,
        *,
        init_embedding: torch.Tensor | None = None,
        seed: int | None = None,
    ) -> "SoftTokens":
        """Build tokens that fit `model` (a diffusers model or a pipeline holding one).

        Args:
            model: a denoiser of a registered family (`softrepa.family`), or a pipeline with
                `.transformer` / `.unet`.
            config: user options (defaults: the paper's).
            init_embedding: (S, token_dim) text embedding of the empty prompt, for
                `init="empty_prompt"`; computed from the pipeline's text encoders when
                `model` is a pipeline and this is None.
            seed: seed for the normal initialisation (None: torch's global RNG).

        Example:
            >>> pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3-medium-diffusers")
            >>> tokens = SoftTokens.for_model(pipe, SoftTokensConfig(num_tokens=4, num_layers=5), seed=0)
            >>> tokens.layout.num_sets, sum(p.numel() for p in tokens.parameters()) < 1_000_000
            (5, True)
        """
        config = config or SoftTokensConfig()
        denoiser = resolve_denoiser(model)
        family = family_of(denoiser)
        layout = family.layout_for(denoiser, config)
        gen_state = None
        if seed is not None:
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(seed)
        try:
            tokens = cls(layout, init_std=config.init_std)
        finally:
            if gen_state is not None:
                torch.random.set_rng_state(gen_state)
        if config.init == "empty_prompt":
            if init_embedding is None:
                init_embedding = _empty_prompt_embedding(model, denoiser)
            # block-space tokens start from the empty prompt mapped into the block width
            projection = family.projection(denoiser) if layout.token_space == "block" else None
            tokens.init_from_embedding(init_embedding, projection=projection)
        try:
            param = next(denoiser.parameters())
            tokens.to(device=param.device)
        except StopIteration:
            pass
        return tokens

    @torch.no_grad()
    def init_from_embedding(self, embedding: torch.Tensor, projection: Callable | None = None) -> None:
        """Set every base token to the BOS position of a prompt embedding (authors' null-text init).

        Args:
            embedding: (S, D) or (1, S, D) text-encoder output of the empty prompt; D must be
                token_dim, or the text width when a `projection` into token_dim is given.
            projection: maps (.., D) to (.., token_dim) (MM-DiT block space: context_embedder).
        """
        emb = embedding.reshape(-1, embedding.shape[-1])[0].float()  # (D,)
        if emb.shape[-1] != self.layout.token_dim:
            if projection is None:
                raise SoftTokensError(
                    f"init embedding width {emb.shape[-1]} != token_dim {self.layout.token_dim}"
                )
            emb = projection(emb.to(_param_dtype(projection))).float()
        self.base.copy_(emb.expand_as(self.base))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        timestep: torch.Tensor | float | int,
        batch_size: int,
        projection: Callable[[torch.Tensor], torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """Tokens for a batch: (B, num_sets, m, model_dim).

        Args:
            timestep: scalar or (B,) timesteps on the 0..1000 scale; each sample uses its own bucket.
            batch_size: B.
            projection: the model's `context_embedder` when token_space == "text".
            dtype, device: cast the result (parameters stay fp32 where they live; the cast is
                differentiable, so gradients still reach them).
        """
        lay = self.layout
        device = device or self.base.device
        base = self.base.to(device)  # (S, m, Dt)
        if lay.token_space == "text":
            if projection is None:
                raise SoftTokensError("text-space tokens need the model's context_embedder as projection")
            base = projection(base.to(_param_dtype(projection)))  # (S, m, D)
        toks = base.unsqueeze(0).expand(batch_size, -1, -1, -1)  # (B, S, m, D)
        if self.time is not None:
            t = torch.as_tensor(timestep, device=device).reshape(-1)
            if t.numel() == 1:
                t = t.expand(batch_size)
            if t.numel() != batch_size:
                raise SoftTokensError(f"got {t.numel()} timesteps for a batch of {batch_size}")
            idx = timestep_buckets(t, lay.time_buckets).to(device)  # (B,)
            time = self.time.to(device)[idx]  # (B, S, D)
            toks = toks + time.unsqueeze(2).to(toks.dtype)  # broadcast over m
        return toks.to(dtype) if dtype is not None else toks

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        lay = self.layout
        where = f"layers={list(lay.layers)}" if lay.layers else f"blocks={list(lay.blocks)}"
        return (f"family={lay.family}, m={lay.num_tokens}, {where}, token_space={lay.token_space}, "
                f"time_buckets={lay.time_buckets}, params={n:,}")


def _param_dtype(module: Any) -> torch.dtype:
    try:
        return next(module.parameters()).dtype
    except (AttributeError, StopIteration):
        return torch.float32


def _empty_prompt_embedding(model: Any, denoiser: nn.Module) -> torch.Tensor:
    """(S, D) text-encoder output of the empty prompt, through the family's prompt encoding."""
    if model is denoiser or not hasattr(model, "encode_prompt"):
        raise SoftTokensError(
            "init='empty_prompt' needs the pipeline (for its text encoders) or init_embedding=..."
        )
    return family_of(denoiser).backbone(model).encode_prompts([""]).embeds[0]


__all__ = ["SoftTokens", "SoftTokensConfig", "SoftTokensError", "TokenLayout", "timestep_buckets"]
