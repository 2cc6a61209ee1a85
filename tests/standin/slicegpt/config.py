"""Test stand-in for the official ``slicegpt.config`` (microsoft/TransformerCompression).

Reproduces ``config``: an ``ml_collections.ConfigDict`` whose ``device`` is where rotation and
calibration compute (``cuda`` when torch sees a GPU, else ``cpu``). As in the official, ``dtype``
is not set here: ``experiments/run_slicegpt.py`` (and whoever runs its call sequence) sets
``config.dtype`` from ``--dtype``; reading it before that raises ``AttributeError``.
"""

import torch
from ml_collections import ConfigDict

config = ConfigDict()
config.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
