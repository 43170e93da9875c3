"""Network protocols: the native framed protocol over TLS, its client, TLS helpers."""
