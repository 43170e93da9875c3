"""amaters: an encrypted key-value database server on Twisted.

Clients encrypt values before they leave the client; the server stores, ranges, filters and updates
them without ever seeing plaintext or a secret key.
"""

__version__ = "0.2.0.dev0"

#: The native protocol version this server speaks (major must match the client's).
PROTOCOL_VERSION = (1, 0, 0)

#: Every protocol version this server accepts in a handshake.
SUPPORTED_PROTOCOL_VERSIONS = ((1, 0, 0),)

__all__ = ["PROTOCOL_VERSION", "SUPPORTED_PROTOCOL_VERSIONS", "__version__"]
