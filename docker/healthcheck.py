"""Container health check: exit 0 when the service's GET /readyz answers 200, else 1.

Used by the image's HEALTHCHECK and by docker-compose.yml. Python, because the image
has no curl or wget. Proxies from the environment are ignored: the probe is local.
"""

import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("VAEBM_PORT", "8000")
    url = f"http://127.0.0.1:{port}/readyz"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except Exception as exc:  # any failure (refused, 503, timeout) means not ready
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
