"""slicebridge: convert, export and verify SliceGPT checkpoints from your own Python env.

The heavy parts live in subpackages and are imported on first use, so that
``import slicebridge`` stays cheap and works in the slicegpt env's server too:

- ``slicebridge.bridge``  wire protocol, signing, env discovery, server lifecycle
- ``slicebridge.client``  the base-env API and CLI (``Bridge``)
- ``slicebridge.server``  what runs inside the slicegpt env
- ``slicebridge.model``   the portable sliced model (torch + transformers only)
"""

__version__ = "0.1.0"

__all__ = ["__version__", "Bridge", "client", "load"]


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
    import os

    if os.path.isdir(path):
        from slicebridge.model.export import load_export

        if callable(map_location) or isinstance(map_location, dict):
            raise TypeError("for an export directory, map_location must be a device (e.g. 'cpu', 'cuda:0')")
        return load_export(path, device=map_location, dtype=dtype)

    from slicebridge.model.binfile import load as load_bin

    return load_bin(path, map_location=map_location, trust_pickle=trust_pickle)


def __getattr__(name):
    if name == "Bridge":
        from slicebridge.client.bridge import Bridge

        return Bridge
    if name == "client":
        import slicebridge.client as client

        return client
    raise AttributeError(f"module 'slicebridge' has no attribute {name!r}")
