"""softrepa: SoftREPA soft text tokens for frozen diffusers text-to-image models.

Public API::

    pipe, handle = softrepa.load_model("stabilityai/stable-diffusion-3-medium-diffusers", tokens="tokens.safetensors")
    tokens = softrepa.SoftTokens.for_model(pipe, softrepa.SoftTokensConfig())
    handle = softrepa.attach(pipe, tokens)      # stock pipeline now uses the tokens
    softrepa.save_soft_tokens(tokens, "tokens.safetensors")
    handle.remove()                             # model restored exactly
    handle = softrepa.load_into(pipe, "tokens.safetensors")   # or a Hub id: "owner/name[@rev][:file]"
    softrepa.push_to_hub("runs/sd3/tokens.safetensors", "owner/name")   # tokens + config + model card
    compiled = softrepa.compile_blocks(pipe)    # regional torch.compile, hooks stay eager

Layers, each importing only those above it: `errors`, `family` (the registry) -> `tokens` ->
`hooks` (attach) -> `backbone` / `flowedit` -> `families/*` (one module per model family) -> `artifact`,
`runfolder`, `generate`, `edit`, `train`, `evaluation` -> `cli/` (argparse only).
"""

from .errors import guard_imports as _guard_imports

_guard_imports()  # Ctrl-C during the imports below: one line and exit 130 at the command line (issue 26)
from . import families  # noqa: E402,F401  (registers the built-in model families)
from ._version import __version__
from .artifact import load_into, load_soft_tokens, save_soft_tokens, token_sets_of
from .branches import configure as set_uncond
from .compilation import CompileConfig, CompiledBlocks, compile_blocks
from .hooks import AttachHandle, attach, attached_handle
from .errors import SoftrepaError, SoftTokensError
from .family import Family, family_of, register_family
from .loading import load_model
from .publish import push_to_hub
from .tokens import SoftTokens, SoftTokensConfig, TokenLayout

__all__ = [
    "AttachHandle",
    "CompileConfig",
    "CompiledBlocks",
    "Family",
    "SoftTokens",
    "SoftTokensConfig",
    "SoftTokensError",
    "SoftrepaError",
    "TokenLayout",
    "__version__",
    "attach",
    "attached_handle",
    "compile_blocks",
    "family_of",
    "load_into",
    "load_model",
    "load_soft_tokens",
    "push_to_hub",
    "register_family",
    "save_soft_tokens",
    "set_uncond",
    "token_sets_of",
]
