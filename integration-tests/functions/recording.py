# An `http` function for the whole-system tests (the local provider gives it PORT):
#
#   python3 recording.py DIR [--fail STATUS] [--delay SECONDS]
#
# GET answers 200. A POST answers STATUS (with --fail) while the file `fixed` does not
# exist in the working directory; otherwise it waits SECONDS, writes the body to
# DIR/<uuid>.txt (aside, then renamed, so a reader never sees half of it) and answers 200.
import argparse, os, time, uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = argparse.ArgumentParser()
args.add_argument("dir")
args.add_argument("--fail", type=int)
args.add_argument("--delay", type=float, default=0.0)
args = args.parse_args()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.answer(200, b"OK")

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if args.fail and not os.path.exists("fixed"):
            return self.answer(args.fail, b"not yet")
        time.sleep(args.delay)
        name = os.path.join(args.dir, uuid.uuid4().hex)
        with open(name + ".tmp", "wb") as f:
            f.write(body)
        os.rename(name + ".tmp", name + ".txt")
        self.answer(200, b"done")

    def answer(self, status, data):
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
