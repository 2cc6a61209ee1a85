"""What runs inside the slicegpt env: the entry point (``main``), request handlers, the model
loaders (official and builtin), the warm model cache, runtime facts and fault injection.

It is not installed in the slicegpt env: the launcher stages it there with ``bridge`` and
``model`` (see ``bridge.launcher``). Torch is imported here and in ``model``, never in ``bridge``.
"""
