__version__ = "0.1.0"
"""The package version: stored in every run's attrs (a leaf module, so the store can import it)."""
