"""kdjax's version (one place: the package, provenance records and exports read it)."""

__version__ = "0.1.0"
