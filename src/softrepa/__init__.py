"""softrepa: SoftREPA soft text tokens for frozen diffusers text-to-image models.

Public API::

    tokens = softrepa.SoftTokens.for_model(pipe, softrepa.SoftTokensConfig())
    handle = softrepa.attach(pipe, tokens)      # stock pipeline now uses the tokens
    softrepa.save_soft_tokens(tokens, "tokens.safetensors")
    handle.remove()                             # model restored exactly
    handle = softrepa.load_into(pipe, "tokens.safetensors")
"""

__version__ = "0.1.0"

from .hooks import AttachHandle, attach, attached_handle
from .io import load_into, load_soft_tokens, save_soft_tokens
from .tokens import SoftTokens, SoftTokensConfig, SoftTokensError, TokenLayout

__all__ = [
    "AttachHandle",
    "SoftTokens",
    "SoftTokensConfig",
    "SoftTokensError",
    "TokenLayout",
    "__version__",
    "attach",
    "attached_handle",
    "load_into",
    "load_soft_tokens",
    "save_soft_tokens",
]
