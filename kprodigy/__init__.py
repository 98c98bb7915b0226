"""K-Prodigy: Prodigy (D-adapted Adam) with a pure functional core and a torch.optim shell."""

from . import functional
from .optim import KProdigy

__version__ = "0.5.0"

__all__ = ["KProdigy", "functional", "__version__"]
