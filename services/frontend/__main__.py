"""``python -m services.frontend``: see ``--help`` and docs/frontend.md."""

import sys

from services.frontend.app import build_server, main, serve  # noqa: F401
from services.frontend.config import Config, parse_config  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
