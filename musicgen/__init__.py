"""musicgen: DiffRhythm song generation in plain PyTorch.

The library core: no Ray, FastAPI, Redis or Prometheus imports here (a test enforces it).
Importing this package does no work: no device probing, no downloads, no model construction.
"""

__version__ = "0.1.0"
