"""Suite-wide settings.

The compiled (fused) ClippyAdagrad path costs seconds of compilation per model; tests that
train models use the eager paths (same numbers), and the compiled path has its own tests,
which ask for it explicitly with ``fused=True``.
"""

import os

os.environ.setdefault("MTL_CLIPPY_DISABLE_FUSED", "1")
