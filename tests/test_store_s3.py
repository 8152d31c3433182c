"""S3 specifics: multipart transfers, retries on throttling and conditional conflicts, presigned least privilege."""

import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fedkeeper.store import StoreError, open_store

pytestmark = pytest.mark.slow


def test_multipart_upload_above_threshold(seaweedfs):
    store = open_store(seaweedfs.url("mp"), multipart_threshold=6 * 1024 * 1024)
    data = bytes(range(256)) * (40 * 1024 * 4 * 4)  # 40 MiB in several parts
    store.put("big.bin", data)
    assert store.get("big.bin") == data
    etag = store.client.head_object(Bucket=seaweedfs.bucket, Key="mp/big.bin")["ETag"]
    assert "-" in etag  # a multipart ETag carries the part count


class _Flaky(BaseHTTPRequestHandler):
    """Answers the first `fail` requests with an S3 error, then succeeds; counts what it saw."""

    fail = 2
    code, status = "SlowDown", 503
    seen: list = []

    def _error(self):
        body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{self.code}</Code>"
                f"<Message>try again</Message></Error>").encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        type(self).seen.append((self.command, self.path))
        if len(type(self).seen) <= type(self).fail:
            return self._error()
        body = b"payload" if self.command == "GET" else b""
        self.send_response(200)
        self.send_header("ETag", '"abc"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = _handle

    def log_message(self, *a):
        return


@pytest.fixture
def flaky(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    servers = []

    def start(code, status, fail):
        handler = type("H", (_Flaky,), {"code": code, "status": status, "fail": fail, "seen": []})
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return handler, f"s3://b/p?endpoint=http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_slowdown_is_retried_with_backoff(flaky):
    # A loopback stand-in, because no real server throttles on demand.
    handler, url = flaky("SlowDown", 503, fail=2)
    assert open_store(url).get("k") == b"payload"
    assert len(handler.seen) == 3


def test_conditional_conflict_is_retried(flaky):
    handler, url = flaky("ConditionalRequestConflict", 409, fail=2)
    assert open_store(url).put_if_absent("k", b"x") is True
    assert len(handler.seen) == 3


def test_retries_give_up_with_a_clear_error(flaky):
    handler, url = flaky("SlowDown", 503, fail=100)
    with pytest.raises(StoreError, match="failed"):
        open_store(url, max_attempts=3).get("k")
    assert len(handler.seen) == 3


def test_missing_bucket_names_the_fix(seaweedfs):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(f"s3://no-such-bucket-xyz/p?endpoint={seaweedfs.endpoint}").put("k", b"x")


def _put(url, data, headers=None):
    req = urllib.request.Request(url, data=data, method="PUT")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status


def test_presigned_urls_cover_exactly_one_key_and_expire(seaweedfs):
    """SeaweedFS checks signatures: a client's URL writes its own update and nothing else."""
    store = open_store(seaweedfs.url("priv"))
    store.put("models/000000.safetensors", b"global")
    mine = store.presign("rounds/000000/updates/alice.safetensors", "PUT", 60)
    assert _put(mine, b"alice's update") == 200
    assert store.get("rounds/000000/updates/alice.safetensors") == b"alice's update"
    for target in ("rounds/000000/updates/bob.safetensors", "models/000000.safetensors"):
        forged = mine.replace("rounds/000000/updates/alice.safetensors", target)
        with pytest.raises(urllib.error.HTTPError) as info:
            _put(forged, b"evil")
        assert info.value.code == 403
    assert store.get("models/000000.safetensors") == b"global"
    assert not store.exists("rounds/000000/updates/bob.safetensors")
    get_url = store.presign("models/000000.safetensors", "GET", 60)
    assert urllib.request.urlopen(get_url, timeout=10).read() == b"global"
    with pytest.raises(urllib.error.HTTPError):  # a GET URL does not allow a PUT
        _put(get_url, b"evil")
    short = store.presign("rounds/000000/updates/carol.safetensors", "PUT", 1)
    time.sleep(2.2)
    with pytest.raises(urllib.error.HTTPError) as info:
        _put(short, b"late")
    assert info.value.code == 403


def _post(post: dict, data: bytes) -> int:
    from fedkeeper.functions.client import _http_post_form

    _http_post_form(post, data)
    return 204


def test_presigned_post_bounds_the_update_size(seaweedfs):
    """The POST policy's content-length-range is enforced by the server: an oversized update never lands."""
    from fedkeeper.functions.context import HandlerError

    store = open_store(seaweedfs.url("post"))
    key = "rounds/000000/updates/alice.safetensors"
    post = store.presign_post(key, 60, max_bytes=1000)
    assert _post(post, b"a" * 900) == 204
    assert store.get(key) == b"a" * 900
    with pytest.raises(HandlerError):
        _post(post, b"b" * 5000)
    assert store.get(key) == b"a" * 900
    other = dict(post, fields=dict(post["fields"], key=post["fields"]["key"].replace("alice", "bob")))
    with pytest.raises(HandlerError):
        _post(other, b"c" * 10)
    assert not store.exists("rounds/000000/updates/bob.safetensors")


def test_a_bounded_read_asks_once_and_leaves_an_oversized_body_unread(seaweedfs, monkeypatch):
    # Prepare: count the requests boto3 sends and the body bytes read from its answers
    from botocore.response import StreamingBody

    from fedkeeper.store import TooLarge

    store = open_store(seaweedfs.url("bounded"))
    store.put("u/ok.bin", b"a" * 5000)
    store.put("u/big.bin", b"b" * 3_000_000)
    requests, read = [], []
    store.client.meta.events.register("before-send.s3", lambda request, **kw: requests.append(request.method))
    real_read = StreamingBody.read

    def counting_read(self, amt=None):
        data = real_read(self, amt)
        read.append(len(data))
        return data

    monkeypatch.setattr(StreamingBody, "read", counting_read)
    # Execute
    ok = store.get_bounded("u/ok.bin", 10_000)
    ok_requests, ok_read = list(requests), sum(read)
    with pytest.raises(TooLarge) as big:
        store.get_bounded("u/big.bin", 1_000_000)
    # Assert: one GET and no HEAD for an update that fits; the oversized one is refused from its headers alone
    assert bytes(ok) == b"a" * 5000 and ok_requests == ["GET"] and ok_read == 5000
    assert big.value.size == 3_000_000 and requests[len(ok_requests):] == ["GET"] and sum(read) == ok_read
    assert store.get("u/ok.bin") == b"a" * 5000  # the client still works after the unread body was dropped
