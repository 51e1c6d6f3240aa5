"""Run a fake cloud until SIGTERM: `python -m tests.fakecloud --cloud azure --user-data FILE`.

Prints one JSON line with the ports once listening, then serves.  Each request is
appended to --log as a JSON line (host wall time `t`), for the end-to-end test.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import IO

from tests.fakecloud import imds
from tests.fakecloud.server import FakeServer, Script


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fakecloud")
    p.add_argument("--cloud", choices=sorted(imds.FACTORIES), default="azure")
    p.add_argument("--user-data", help="file served as user-data (absent: no user-data)")
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--imds-port", type=int, default=0)
    p.add_argument("--wireserver-port", type=int, default=0)
    p.add_argument("--log", help="append one JSON line per request here")
    p.add_argument("--no-json-endpoint", action="store_true", help="wireserver without /provisioning/health")
    args = p.parse_args(argv)

    user_data = None
    if args.user_data:
        with open(args.user_data, "rb") as f:
            user_data = f.read()
    log: IO[str] | None = open(args.log, "a", encoding="utf-8") if args.log else None  # noqa: SIM115
    servers = [
        FakeServer(
            "imds", imds.FACTORIES[args.cloud](user_data, Script()), host=args.bind, port=args.imds_port, log=log
        )
    ]
    ports = {"imds_port": servers[0].port}
    if args.cloud == "azure":
        from tests.fakecloud import wireserver

        ws = wireserver.FakeWireserver(
            host=args.bind, port=args.wireserver_port, log=log, json_endpoint=not args.no_json_endpoint
        )
        servers.append(ws.server)
        ports["wireserver_port"] = ws.server.port
    for s in servers:
        s.start()
    print(json.dumps(ports), flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    for s in servers:
        s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
