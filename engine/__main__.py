"""`python -m vipo.engine ...` is the `vipo` command (torchrun launches it this way)."""

import os
import sys

# `python -m` puts the working directory first on sys.path. Run from a vipo checkout, that
# exposes the source folders engine/, kernels/ and loaders/ as top-level modules, and
# transformers would take ./kernels for PyPI's `kernels` package. vipo itself is imported
# through its installed `vipo.*` names, so the checkout's root is not needed on the path.
_cwd = os.getcwd()
if os.path.isfile(os.path.join(_cwd, "kernels", "reference.py")):
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _cwd]

from vipo.engine.entry import main  # noqa: E402

sys.exit(main())
