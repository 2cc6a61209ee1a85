"""What runs inside the slicegpt env: request handlers, runtime facts, (later) loaders and the model cache.

This package is the only place on the server side that imports torch. It is not
installed in the slicegpt env: the launcher stages it there (see ``bridge.launcher``).
"""
