"""Torch dtypes as plain names (``torch.float16`` -> ``"float16"``): the one spelling every layer uses.

Stdlib only (it never imports torch), so the wire protocol, the model code and the staged
server share it.
"""

from __future__ import annotations


def dtype_name(dtype) -> str:
    """A torch dtype (or its name, with or without the ``torch.`` prefix) as a plain name."""
    return str(dtype).removeprefix("torch.")
