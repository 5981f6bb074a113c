#!/usr/bin/env python3
"""A `process` function: the request body arrives on stdin, stdout is the response.

Request headers arrive as Http_* environment variables, as with OpenFaaS's classic
watchdog (Http_Method, Http_Path, Http_Query, Http_X_Call_Id, ...).
"""
import os
import sys

body = sys.stdin.read().strip()
name = body or "world"
method = os.environ.get("Http_Method", "?")
call_id = os.environ.get("Http_X_Call_Id", "-")
# stderr goes to the function's log (GET /system/logs?name=hello).
print(f"hello: {method} call {call_id}, {len(body)} bytes", file=sys.stderr)
print(f"Hello, {name}!")
