# asgi.py: an ASGI app for uvicorn that drains keep-alive connections gently.
# Run: python3 -m uvicorn asgi:app --host 0.0.0.0 --port $PORT, deployed with --stop-signal SIGUSR1.
# On SIGTERM uvicorn closes idle keep-alive connections at once, while a client may be sending on one.
# So portflip sends SIGUSR1 instead: every answer from then on says "Connection: close" (uvicorn closes
# the connection after it), and 2 s later the app asks uvicorn for its usual graceful stop.
import os
import signal
import threading

VERSION = os.environ.get("APP_VERSION", "v1").encode()
GRACE_S = 2.0
draining = False


def on_usr1(signum, frame):
    global draining
    draining = True
    threading.Timer(GRACE_S, os.kill, (os.getpid(), signal.SIGTERM)).start()


signal.signal(signal.SIGUSR1, on_usr1)  # uvicorn handles SIGINT and SIGTERM only


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass  # a POST body is read and dropped
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(VERSION)).encode())]
    if draining:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": VERSION})
