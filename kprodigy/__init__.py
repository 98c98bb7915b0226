"""K-Prodigy: Prodigy (D-adapted Adam) with a pure functional core and a torch.optim shell."""

from . import functional
from .optim import DGroupDiagnostics, Diagnostics, KProdigy, KProdigyWarning, log_dict

__version__ = "0.6.0"

__all__ = [
    "DGroupDiagnostics",
    "Diagnostics",
    "KProdigy",
    "KProdigyWarning",
    "functional",
    "log_dict",
    "__version__",
]
