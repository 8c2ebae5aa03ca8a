"""cmr-search: an embedding store and similarity search service for cine cardiac MRI.

One namespace, one floor per package (docs/ARCHITECTURE.md): ``core`` at the ground;
``metrics``, ``synth`` and ``store`` above it; ``ingest`` and ``encoder``; ``heads``; the
search service ``api``; ``evals`` and the command line ``cli`` on top.
"""

__version__ = "0.1.0"
