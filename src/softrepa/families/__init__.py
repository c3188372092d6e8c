"""The built-in model families, one module each; importing this package registers them.

Adding a family: write `families/<name>.py` (a `Family` subclass + its `Backbone` + hooks, ending
with `register_family(...)`) and add its import below — see docs/design-notes.md.
"""

from . import flux, sd3, unet  # noqa: F401  (registration)
from . import qwenimage  # noqa: F401  (registration)
from . import flux2  # noqa: F401  (registration)

__all__: list[str] = []
