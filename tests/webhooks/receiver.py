#!/usr/bin/env python3
"""A webhook receiver for the tests: every delivery is verified with the reference
Standard Webhooks library (PyPI `standardwebhooks`), not with the gateway's code.

Serves https with --tls CERT KEY. Prints one JSON line per delivery on stdout: {"verified": true, "id": ..., "event":
{...}} or {"verified": false, "error": ...}; first a line {"port": N}. Answers
--status (204) after --delay seconds to verified deliveries, 400 to the others.
"""
import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--secret", required=True)
parser.add_argument("--status", type=int, default=204)
parser.add_argument("--delay", type=float, default=0.0)
parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), help="serve https")
args = parser.parse_args()

verifier = Webhook(args.secret)
printing = threading.Lock()


def say(record):
    with printing:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()


class Receiver(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if args.delay:
            time.sleep(args.delay)
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            event = verifier.verify(body, headers)
            say({"verified": True, "id": headers.get("webhook-id"), "event": event})
            status = args.status
        except Exception as error:  # the verifier's refusal, whatever its class
            say({"verified": False, "error": f"{type(error).__name__}: {error}"})
            status = 400
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_):
        pass


class Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


server = Server(("127.0.0.1", args.port), Receiver)
if args.tls:
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*args.tls)
    server.socket = context.wrap_socket(server.socket, server_side=True)
say({"port": server.server_address[1]})
server.serve_forever()
