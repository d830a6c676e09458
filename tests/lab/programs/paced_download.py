"""An HTTP download that takes its time until told to hurry, for tests that must keep one
connection open across an event (a gateway restart, an upgrade, a reload).

    python paced_download.py HOST PORT PATH GO_FILE      (HOST: a name or a bare address)

Reads the body in 16 KiB steps every 0.1 s (about 160 KiB/s) until GO_FILE exists, then as
fast as it comes. Prints one JSON line: {"status", "bytes", "sha256", "seconds"} (status -1:
the connection failed, with "error").
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    host, port, path, go_file = argv[0], int(argv[1]), argv[2], argv[3]
    started = time.monotonic()
    digest, size = hashlib.sha256(), 0
    try:
        connection = http.client.HTTPConnection(host, port, timeout=60)
        connection.request("GET", path)
        response = connection.getresponse()
        while True:
            hurry = os.path.exists(go_file)
            chunk = response.read(1 << 20 if hurry else 16 << 10)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
            if not hurry:
                time.sleep(0.1)
        status = response.status
    except OSError as exc:
        print(json.dumps({"status": -1, "bytes": size, "error": str(exc),
                          "seconds": round(time.monotonic() - started, 1)}), flush=True)
        return 1
    print(json.dumps({"status": status, "bytes": size, "sha256": digest.hexdigest(),
                      "seconds": round(time.monotonic() - started, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
