"""Helpers for frameworks that need more than the plain ``KProdigy`` class (imported on demand)."""
