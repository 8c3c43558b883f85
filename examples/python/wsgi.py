# wsgi.py: a WSGI app for gunicorn. Run: gunicorn --bind 0.0.0.0:$PORT --workers 2 wsgi:app
# gunicorn's default (sync) workers answer every request with "Connection: close", and on SIGTERM the
# master closes the listener and lets each worker finish its request: nothing to add for portflip.
import os

VERSION = os.environ.get("APP_VERSION", "v1").encode()


def app(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    environ["wsgi.input"].read(length)  # a POST body is read and dropped
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(VERSION)))])
    return [VERSION]
