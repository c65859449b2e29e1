"""The errors and warnings flowyml raises; see the tree in :mod:`flowyml._errors`."""

from ._errors import *  # noqa: F403
from ._errors import __all__ as __all__
