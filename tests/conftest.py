"""Suite-wide settings.

The compiled (fused) ClippyAdagrad path costs seconds of compilation per model; tests that
train models use the eager paths (same numbers), and the compiled path has its own tests,
which ask for it explicitly with ``fused=True``.

Property-based tests (hypothesis) run under one of two profiles:

* ``ci`` (the default): a bounded number of examples drawn from a fixed seed
  (``derandomize``), so the default suite is fast and gives the same cases every run;
* ``slow``: many more examples, random each run, for a deeper search:
  ``python -m pytest -q --hypothesis-profile=slow tests/``.
"""

import os

from hypothesis import HealthCheck, settings

os.environ.setdefault("MTL_CLIPPY_DISABLE_FUSED", "1")

settings.register_profile(
    "ci",
    max_examples=40,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "slow",
    max_examples=1000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Torch warns, once a process, that sparse invariant checks are "implicitly disabled" when a
# test builds a sparse gradient; off is torch's default, made explicit (as the module does for
# runs with sparse embeddings: models/module.py).
import torch  # noqa: E402

torch.sparse.check_sparse_tensor_invariants.disable()
