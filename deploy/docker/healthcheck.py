#!/usr/bin/env python3
"""The image's HEALTHCHECK: exit 0 when loraserve's `GET /health` answers 200, else 1.

`/health` answers 503 while the model loads in the background and while the step loop is not running, so Docker
marks the container `starting` (within --start-period) then `unhealthy` if it never gets there. The port is the
`PORT` variable (set it rather than `--port` in a container, so this check finds the server); the address is
loopback unless LORASERVE_HOSTNAME names one address. Standard library only: the image has no curl.

Given URLs as arguments, it checks each of them instead: the KubeRay pods (deploy/kubernetes/ray/) probe Ray's own
health endpoints with it, since KubeRay's default probes run `wget`, which the image does not have either.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def health_url() -> str:
    host = os.environ.get("LORASERVE_HOSTNAME") or "0.0.0.0"
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    return f"http://{host}:{os.environ.get('PORT') or '3000'}/health"


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("LORASERVE_HEALTHCHECK_TIMEOUT", "4"))) as reply:
            status = reply.status
    except urllib.error.HTTPError as error:
        status = error.code
    except (OSError, ValueError) as error:
        print(f"loraserve-healthcheck: {url}: {error}", file=sys.stderr)
        return False
    if status != 200:
        print(f"loraserve-healthcheck: {url} answered {status}", file=sys.stderr)
        return False
    return True


def main(urls: list[str]) -> int:
    return 0 if all(healthy(url) for url in urls or [health_url()]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
