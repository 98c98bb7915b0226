"""The ``torch.optim.Optimizer`` shell of K-Prodigy."""

from ._diagnostics import DGroupDiagnostics, Diagnostics, KProdigyWarning, log_dict
from ._kprodigy import KProdigy

__all__ = ["DGroupDiagnostics", "Diagnostics", "KProdigy", "KProdigyWarning", "log_dict"]
