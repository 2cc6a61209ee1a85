"""The base-env side of slicebridge: ``Bridge`` (explicit lifetime) and the CLI.

    from slicebridge.client import Bridge
    with Bridge(env="slicegpt") as bridge:
        bridge.hello()
"""

from slicebridge.client.bridge import Bridge

__all__ = ["Bridge"]
