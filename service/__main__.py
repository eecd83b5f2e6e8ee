"""``python -m service``: the same as ``vaebm serve``."""

from service.main import serve

raise SystemExit(serve())
