"""Regional compilation: `torch.compile` the repeated blocks of a denoiser, the token hooks eager.

diffusers recommends compiling the repeated blocks of a DiT / UNet rather than the whole model
(`ModelMixin.compile_repeated_blocks`): one compiled code object serves every block, so compile
time is that of one block, and the untouched top level (embeddings, the pipeline's loop) costs
nothing to trace. softrepa does the same with one difference, argued here:

* **Only the blocks' `forward` is compiled, not `Module.__call__`.** `nn.Module.compile()` compiles
  `_call_impl`, i.e. the forward hooks too; dynamo does not guard on a module's hook dictionaries
  (`torch._dynamo.config.skip_nnmodule_hook_guards`), so a compiled block would keep running token
  hooks that `handle.remove()` took away, or ignore ones attached later. With `forward` compiled,
  the hooks run eagerly around it: attaching, `handle.disabled()` and detaching behave exactly as
  without compilation, and what they cost (one `cat` and one slice per selected block) has nothing
  a compiler could fuse away.
* **Static shapes by default.** A training run has fixed shapes (batch, pair chunk, text length),
  so each (grad mode, text length with / without tokens, last-block variant, last partial chunk)
  combination compiles once during the first step and never again; every later step reuses them
  (`tests/test_compile.py` asserts no recompilation across steps). Each combination is one cache
  entry of the shared block code object, so the recompile limit is raised to `recompile_limit`
  (dynamo's default of 8 is below the ~10 entries of a chunked SD3 step, and past it dynamo
  silently falls back to eager). `dynamic=True` trades a slower kernel for fewer compilations.

Which blocks: the classes a diffusers model names in `_repeated_blocks`, else the family's
`Family.repeated_blocks` (SD3's transformer does not declare them).

Example:
    >>> handle = softrepa.load_into(pipe, "tokens.safetensors")
    >>> compiled = softrepa.compile_blocks(pipe)           # before the first call
    >>> image = pipe("a red circle left of a blue square").images[0]   # first call compiles
    >>> compiled.remove()                                 # the eager blocks again
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, SoftTokensError
from .family import family_of, resolve_denoiser


@dataclass(frozen=True)
class CompileConfig:
    """How the repeated blocks are compiled (the keyword arguments of `torch.compile`).

    Args:
        mode: torch.compile mode (None: inductor's default; "max-autotune-no-cudagraphs" searches
            kernels longer). CUDA-graph modes ("reduce-overhead", "max-autotune") are refused:
            the blocks see tensors whose storage the token hooks make per call.
        dynamic: False compiles each shape once (best kernels, fixed training shapes); True marks
            shapes dynamic (fewer compilations when shapes vary, e.g. many image sizes).
        fullgraph: True makes a graph break inside a block an error instead of a silent slowdown.
        backend: torch.compile backend ("inductor"; "eager" / "aot_eager" for debugging).
        recompile_limit: at least this many cache entries per compiled code object.
    """

    mode: str | None = None
    dynamic: bool | None = False
    fullgraph: bool = True
    backend: str = "inductor"
    recompile_limit: int = 64

    def __post_init__(self) -> None:
        if self.mode in ("reduce-overhead", "max-autotune"):
            raise ConfigError(f"compile mode {self.mode!r} uses CUDA graphs, which the per-call soft tokens "
                              "break; use None (default) or 'max-autotune-no-cudagraphs'")
        if self.recompile_limit < 1:
            raise ConfigError(f"compile recompile_limit must be >= 1, got {self.recompile_limit}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CompiledBlocks:
    """Result of `compile_blocks`: the blocks whose `forward` is compiled; `remove()` restores them."""

    def __init__(self, denoiser: nn.Module, blocks: list[nn.Module], config: CompileConfig):
        self.denoiser, self.blocks, self.config = denoiser, blocks, config

    def remove(self) -> None:
        """Give every block back its class's eager `forward` (the instance attribute is deleted)."""
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        self.blocks = []

    def __enter__(self) -> "CompiledBlocks":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self.blocks)

    def __repr__(self) -> str:
        kinds = sorted({type(b).__name__ for b in self.blocks})
        return f"CompiledBlocks({type(self.denoiser).__name__}, {len(self.blocks)} blocks: {', '.join(kinds)})"


def repeated_blocks(model_or_pipeline: Any) -> list[nn.Module]:
    """The blocks regional compilation compiles, in module order.

    Raises:
        SoftTokensError: the model's family is not registered, or it declares no repeated blocks.
    """
    denoiser = resolve_denoiser(model_or_pipeline)
    names = tuple(getattr(denoiser, "_repeated_blocks", None) or family_of(denoiser).repeated_blocks)
    blocks = [m for m in denoiser.modules() if type(m).__name__ in names]
    if not blocks:
        raise SoftTokensError(f"{type(denoiser).__name__}: no repeated blocks to compile (looked for {list(names)})")
    return blocks


def compile_blocks(model_or_pipeline: Any, config: CompileConfig | None = None) -> CompiledBlocks:
    """Compile the repeated blocks of a denoiser in place (their `forward` only; hooks stay eager).

    Works before or after `attach`; tokens can be attached, disabled and removed freely afterwards.
    The first call of each new shape compiles (seconds to minutes); later calls reuse the code.

    Args:
        model_or_pipeline: a denoiser of a registered family, or a pipeline holding one (then every
            denoiser of the pipeline the family uses: both experts of Wan 2.2 A14B).
        config: `CompileConfig` (default: inductor, static shapes, fullgraph).
    Returns:
        A `CompiledBlocks`; `.remove()` gives the blocks their eager forward back.
    Raises:
        SoftTokensError: already compiled, or no repeated blocks found.

    Example:
        >>> compiled = compile_blocks(pipe.transformer, CompileConfig(mode="max-autotune-no-cudagraphs"))
    """
    config = config or CompileConfig()
    denoiser = resolve_denoiser(model_or_pipeline)
    # a pipeline: every denoiser its family runs (Wan 2.2 A14B's two experts); a bare model: itself
    models = ([denoiser] if model_or_pipeline is denoiser
              else family_of(denoiser).denoisers(model_or_pipeline, denoiser))
    blocks = [b for m in models for b in repeated_blocks(m)]
    if any("forward" in b.__dict__ for b in blocks):
        raise SoftTokensError(f"{type(denoiser).__name__}: its blocks are already compiled (or their forward "
                              "was replaced); call .remove() on the earlier CompiledBlocks first")
    dynamo = torch._dynamo.config
    # torch < 2.7 calls it cache_size_limit; the setting is process-wide and stays raised after remove()
    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, name, max(getattr(dynamo, name), config.recompile_limit))
    for block in blocks:
        # bound method -> compiled function stored on the instance; the class's forward is untouched
        block.forward = torch.compile(block.forward, mode=config.mode, dynamic=config.dynamic,
                                      fullgraph=config.fullgraph, backend=config.backend)
    return CompiledBlocks(denoiser, blocks, config)


__all__ = ["CompileConfig", "CompiledBlocks", "compile_blocks", "repeated_blocks"]
