"""The container's HEALTHCHECK: exit 0 when this host's `reskd serve` answers GET /v2/health/ready with 200, else
1. The port is the one the server reads (RESKD_PORT, default 8000); the standard library only, so a probe every few
seconds costs a few milliseconds of CPU.

    python -m reskd.service.healthcheck
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

READY_PATH = "/v2/health/ready"


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('RESKD_PORT', '8000')}{READY_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as err:  # HTTPError (503 while loading) is a URLError
        print(f"{url}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
