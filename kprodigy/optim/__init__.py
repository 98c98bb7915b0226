"""The ``torch.optim.Optimizer`` shell of K-Prodigy."""

from ._kprodigy import KProdigy

__all__ = ["KProdigy"]
