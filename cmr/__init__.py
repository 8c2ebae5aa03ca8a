"""cmr-search: the command line, settings and errors shared by every stage."""

__version__ = "0.1.0"
