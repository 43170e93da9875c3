# twistd -ny amaters.tac
#
# Builds the amaters service tree from the TOML file named by AMATERS_CONFIG (or the built-in defaults),
# with AMATERS_<SECTION>__<KEY> environment overrides applied.  The same tree as `twistd -n amaters`.
import os
import sys

from twisted.application import service

from amaters.compose import build_service, load_server_config
from amaters.config import ConfigError, Sources

_path = os.environ.get("AMATERS_CONFIG") or None
try:
    _config = load_server_config(_path, (), os.environ)
except ConfigError as _e:
    sys.stderr.write("amaters: invalid configuration:\n  " + "\n  ".join(_e.problems) + "\n")
    raise SystemExit(2)

application = service.Application("amaters")
_root = build_service(_config, sources=Sources(_path, (), None))
_root.exit_on_failure = True  # a failed start or stop exits 1; a clean drain exits 0
_root.setServiceParent(application)
