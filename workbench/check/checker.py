"""The checks under their historical module name: ``from workbench.check import checker`` keeps
working for notebooks, benchmarks and scripts.  Each check lives in its own module of
:mod:`workbench.check`; this module only re-exports them."""

from workbench.check import *  # noqa: F403
from workbench.check import __all__ as _names

__all__ = list(_names)
