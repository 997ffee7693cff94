"""Surogate: a declarative compiler and runtime for training causal language models."""

__version__ = "0.1.0"

# Run from a source checkout without an install (e.g. a GPU machine): the root folders (compiler/, runtime/, ...)
# are the `surogate.*` subpackages, as setup.py maps them. An installed copy has no setup.py beside it.
import os as _os  # noqa: E402

_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "setup.py")) and _root not in __path__:
    __path__.append(_root)
