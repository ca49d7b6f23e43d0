"""memcalc: GPU memory calculator for training and serving large language models.

The package is layered: ``config`` (validated inputs), ``library`` (bundled model
configs), ``estimate`` (pure functions from configs to byte counts) and ``cli``
(parsing and rendering). Nothing here imports torch, numpy or rich at import time.
"""

__version__ = "0.1.0"
