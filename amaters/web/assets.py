"""The operator console's static files, shipped inside the package (``amaters/web/console/``).

The console is a single page that reads the server's own JSON (``/admin/...``, ``/health``,
``/readyz``) and ``/metrics`` from the browser; it holds no policy of its own.  Only the files
listed in :data:`CONSOLE_FILES` are served, from memory after the first request (about 60 KB), with
a Content-Security-Policy that allows nothing but this origin: no external network at runtime.
"""

from __future__ import annotations

from importlib import resources

#: Every file the console serves: name under ``/console/`` → content type.
CONSOLE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "vendor/uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "vendor/uPlot.min.css": "text/css; charset=utf-8",
    "vendor/uPlot.LICENSE": "text/plain; charset=utf-8",
}

#: Scripts and styles from this origin only; JSON from this origin only; no frames, forms or plugins.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

HEADERS = {
    b"content-security-policy": CONTENT_SECURITY_POLICY.encode(),
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-cache",
}


class ConsoleAssets:
    """Reads the console's files from the package once, on first use."""

    def __init__(self, package: str = "amaters.web", folder: str = "console") -> None:
        self.package = package
        self.folder = folder
        self._cache: dict[str, bytes] = {}

    def get(self, name: str) -> tuple[bytes, str] | None:
        """(body, content type) of a listed file, or None for any other name."""
        content_type = CONSOLE_FILES.get(name)
        if content_type is None:
            return None
        body = self._cache.get(name)
        if body is None:
            body = resources.files(self.package).joinpath(self.folder, *name.split("/")).read_bytes()
            self._cache[name] = body
        return body, content_type


__all__ = ["CONSOLE_FILES", "CONTENT_SECURITY_POLICY", "ConsoleAssets"]
