"""``slicebridge.load``: one call for both artifact formats, dispatched by what the path is.

A file is a ``.bin`` (``binfile.load``: only slicebridge's rebuild functions may run); a
directory is an export (``export.load_export``: slicebridge's own classes, no remote code).
"""

from __future__ import annotations

import os


def load(path, *, map_location="cpu", trust_pickle=False, dtype=None):
    """Load a slicebridge ``.bin`` safely, or a slicebridge export directory.

    A ``.bin``: only slicebridge's rebuild functions may run. Returns the seed's dict
    (``model``, ``tokenizer``, ``method``, ``pruning_ratio``, ``actual_ratio``, ``config``,
    ...). A file that references anything else (the seed's own pickles included) is
    refused with an explanation; ``trust_pickle=True`` loads it anyway, for files you trust.

    A directory (what ``export`` writes): loaded with slicebridge's own classes, without
    ``trust_remote_code``; returns ``model``, ``tokenizer``, ``config``, ``provenance``.
    ``map_location`` is the device and ``dtype`` casts the weights (directories only).
    """
    if os.path.isdir(path):
        from slicebridge.model.export import load_export

        if callable(map_location) or isinstance(map_location, dict):
            raise TypeError("for an export directory, map_location must be a device (e.g. 'cpu', 'cuda:0')")
        return load_export(path, device=map_location, dtype=dtype)

    from slicebridge.model.binfile import load as load_bin

    return load_bin(path, map_location=map_location, trust_pickle=trust_pickle)
