"""S3-compatible store on boto3: create-only with If-None-Match, compare-and-swap with If-Match, presigned URLs."""

from __future__ import annotations

import io
import os
from urllib.parse import parse_qs, urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, ConnectTimeoutError, EndpointConnectionError,
                                 NoCredentialsError, PartialCredentialsError, ReadTimeoutError)

from fedkeeper.store.base import NotFound, Store, StoreError, TooLarge, check_key

MULTIPART_THRESHOLD = 64 * 1024 * 1024
_PRECONDITION = {"PreconditionFailed", "412"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


def _truthy(v: str | None) -> bool:
    return str(v).lower() in ("1", "true", "yes", "on")


class S3Store(Store):
    """`s3://bucket/prefix?endpoint=URL&region=R&path_style=1`; credentials come from boto3's standard chain."""

    def __init__(self, url: str, endpoint_url: str | None = None, region: str | None = None,
                 path_style: bool | None = None, multipart_threshold: int = MULTIPART_THRESHOLD,
                 max_attempts: int = 8) -> None:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"invalid S3 URL {url!r}: use s3://bucket/prefix")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if "endpoint_url" in query:  # boto3's own name for it
            query.setdefault("endpoint", query.pop("endpoint_url"))
        unknown = sorted(set(query) - {"endpoint", "region", "path_style"})
        if unknown:
            raise ValueError(f"unknown option {', '.join(unknown)} in the store URL {url!r}; an s3:// store takes "
                             "?endpoint=URL, ?region=R and ?path_style=1")
        self.url = url
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/") + "/" if parts.path.strip("/") else ""
        endpoint = (endpoint_url or query.get("endpoint") or os.environ.get("FEDKEEPER_S3_ENDPOINT")
                    or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
        region = region or query.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        if path_style is None:
            path_style = _truthy(query.get("path_style")) if "path_style" in query else bool(endpoint)
        # botocore's standard retry mode backs off on 503 SlowDown and throttling; 409
        # ConditionalRequestConflict (a concurrent conditional write) is retried the same way.
        self._config = Config(signature_version="s3v4", region_name=region,
                              retries={"mode": "standard", "total_max_attempts": max_attempts},
                              s3={"addressing_style": "path" if path_style else "auto"})
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=self._config)
        self.client.meta.events.register("needs-retry.s3", _retry_conditional_conflict)
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=max(5 * 2**20, multipart_threshold // 4))
        self.multipart_threshold = multipart_threshold

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _fail(self, exc: ClientError | BotoCoreError, key: str, op: str) -> Exception:
        if not isinstance(exc, ClientError):
            return self._unreachable(exc, key, op)
        code = exc.response.get("Error", {}).get("Code", "")
        if code in _MISSING:
            return NotFound(key)
        if code == "NoSuchBucket":
            return StoreError(f"bucket {self.bucket!r} does not exist; create it first (aws s3 mb s3://{self.bucket})")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StoreError(f"{op} {key} in s3://{self.bucket} was refused ({code}); check the AWS credentials "
                              "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or a role) and their permissions")
        return StoreError(f"{op} {key} in s3://{self.bucket} failed: {exc}")

    def _unreachable(self, exc: BotoCoreError, key: str, op: str) -> Exception:
        """Failures before S3 answered: no credentials, or an endpoint that cannot be reached."""
        where = self.client.meta.endpoint_url
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(f"no AWS credentials for s3://{self.bucket}: boto3 tried AWS_ACCESS_KEY_ID/"
                              "AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws/credentials, and the instance or "
                              "function role; set the two variables (for MinIO or SeaweedFS, the server's access "
                              "key) or a profile")
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)):
            return StoreError(f"cannot reach the S3 endpoint {where} for s3://{self.bucket} ({type(exc).__name__}); "
                              "check ?endpoint= in the store URL (or AWS_ENDPOINT_URL) and that the server is running")
        return StoreError(f"{op} {key} in s3://{self.bucket} at {where} failed: {exc}")

    def get(self, key: str) -> bytes:
        """Bytes at key."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, key, "get") from None

    def _ranged(self, key: str, first: int, last: int) -> dict | None:
        """get_object for bytes first..last (inclusive), its body unread; None where the object has no byte `first`
        (an empty object)."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes={int(first)}-{int(last)}")
        except (ClientError, BotoCoreError) as exc:
            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return None
            raise self._fail(exc, key, "get") from None

    def get_view(self, key: str, max_bytes: int | None = None) -> bytes | memoryview:
        """Bytes at key; with max_bytes a ranged GET reads at most max_bytes + 1 of them."""
        if max_bytes is None:
            return self.get(key)
        obj = self._ranged(key, 0, max_bytes)
        return b"" if obj is None else obj["Body"].read()

    def get_bounded(self, key: str, max_bytes: int) -> bytes | memoryview:
        """One ranged GET: the object's size comes from the response's Content-Range before its body is read, so an
        object over max_bytes is refused without downloading it and without a HEAD first (a request per update)."""
        obj = self._ranged(key, 0, max_bytes)
        if obj is None:
            return b""
        body = obj["Body"]
        total = _total_size(obj)
        if total is None or total > max_bytes:
            body.close()  # the body is left unread: closing drops the connection instead of draining it
            if total is None:  # no size in the answer: ask the way every store can
                return super().get_bounded(key, max_bytes)
            raise TooLarge(key, total, max_bytes)
        try:
            data = body.read()
        except BotoCoreError as exc:
            raise self._fail(exc, key, "get") from None
        if len(data) > max_bytes:
            raise TooLarge(key, len(data), max_bytes)
        return data

    def get_range(self, key: str, start: int, end: int) -> bytes | memoryview:
        """A ranged GET of bytes [start, end)."""
        if end <= start:
            return b""
        obj = self._ranged(key, start, end - 1)
        return b"" if obj is None else obj["Body"].read()

    def _head(self, key: str) -> dict:
        """The object's HEAD answer (size, ETag), without its bytes; raises NotFound."""
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, key, "head") from None

    def size(self, key: str) -> int:
        """ContentLength from a HEAD request."""
        return int(self._head(key)["ContentLength"])

    def version(self, key: str) -> str:
        """The ETag from a HEAD request, as get_versioned's GET returns it."""
        return self._head(key)["ETag"]

    def presign_post(self, key: str, expires_s: int, max_bytes: int) -> dict:
        """A presigned POST policy for exactly this key whose content-length-range bounds the upload's size."""
        return self.client.generate_presigned_post(
            self.bucket, self._key(key), Conditions=[["content-length-range", 0, int(max_bytes)]],
            ExpiresIn=int(expires_s))

    def put(self, key: str, data: bytes) -> None:
        """Single PUT (atomic on S3); objects above the threshold go up in parts, also atomic on completion."""
        try:
            if len(data) >= self.multipart_threshold:
                self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key), Config=self._transfer)
            else:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, key, "put") from None

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """PUT with If-None-Match: * ; 412 means someone else created it first."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
            return True
        except (ClientError, BotoCoreError) as exc:
            if getattr(exc, "response", {}).get("Error", {}).get("Code") in _PRECONDITION:
                return False
            raise self._fail(exc, key, "create") from None

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """Bytes and the object's ETag."""
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return obj["Body"].read(), obj["ETag"]
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, key, "get") from None

    def put_if_match(self, key: str, data: bytes, version: str) -> bool:
        """PUT with If-Match: ETag ; 412 means the object changed since it was read."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfMatch=version)
            return True
        except (ClientError, BotoCoreError) as exc:
            if getattr(exc, "response", {}).get("Error", {}).get("Code") in _PRECONDITION | _MISSING:
                return False
            raise self._fail(exc, key, "swap") from None

    def list(self, prefix: str = "") -> list[str]:
        """Every key under prefix (paginated past 1,000), sorted."""
        out = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                out.extend(o["Key"][len(self.prefix):] for o in page.get("Contents", []))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, prefix, "list") from None
        return sorted(out)

    def delete(self, key: str) -> None:
        """Remove key; S3 deletes of missing keys succeed."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, key, "delete") from None

    def exists(self, key: str) -> bool:
        """HEAD the key."""
        try:
            self._head(key)
            return True
        except NotFound:
            return False

    def presign(self, key: str, method: str, expires_s: int, max_bytes: int | None = None) -> str:
        """A SigV4 URL for GET or PUT of exactly this key, valid for expires_s seconds.

        S3 cannot bound a presigned PUT's size except by signing an exact Content-Length, which the
        client does not know in advance: clients upload through presign_post's policy instead, and the
        aggregator checks the size of what lands before reading it.
        """
        op = {"GET": "get_object", "PUT": "put_object"}.get(method.upper())
        if op is None:
            raise ValueError(f"presign supports GET and PUT, not {method}")
        try:
            return self.client.generate_presigned_url(op, Params={"Bucket": self.bucket, "Key": self._key(key)},
                                                      ExpiresIn=int(expires_s))
        except BotoCoreError as exc:
            raise self._fail(exc, key, "presign") from None

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self.client.close()


def _retry_conditional_conflict(response, attempts, caught_exception, **_):
    """Ask botocore to retry 409 ConditionalRequestConflict like a throttle; None leaves other decisions to it."""
    if response is None or attempts >= 5:
        return None
    err = (response[1] or {}).get("Error", {}) if isinstance(response, tuple) else {}
    if err.get("Code") == "ConditionalRequestConflict":
        return 0.05 * (2 ** attempts)
    return None


def _total_size(obj: dict) -> int | None:
    """The whole object's size from a ranged GET's answer: Content-Range's total ("bytes 0-9/1234"), or the
    length when the server sent the whole object; None if neither says."""
    content_range = obj.get("ContentRange")
    if isinstance(content_range, str) and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        return int(total) if total.isdigit() else None
    length = obj.get("ContentLength")
    return int(length) if isinstance(length, int) and not content_range else None
