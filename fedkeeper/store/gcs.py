"""Google Cloud Storage store: create-only with if_generation_match=0, compare-and-swap on the generation."""

from __future__ import annotations

import datetime as dt
import os
from urllib.parse import urlsplit

from google.api_core import exceptions as gexc
from google.cloud import storage

from fedkeeper.store.base import NotFound, Store, StoreError, check_key


def _failures() -> tuple[type[Exception], ...]:
    """What a GCS call raises besides API errors: auth failures and connections that never reached GCS."""
    from google.auth.exceptions import GoogleAuthError, TransportError
    from requests.exceptions import ConnectionError as RequestsConnectionError
    from requests.exceptions import Timeout

    return (gexc.GoogleAPIError, GoogleAuthError, TransportError, RequestsConnectionError, Timeout)


_FAILURES = _failures()


class GCSStore(Store):
    """`gs://bucket/prefix`; honours STORAGE_EMULATOR_HOST, else Application Default Credentials."""

    def __init__(self, url: str, project: str | None = None, client: storage.Client | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "gs" or not parts.netloc:
            raise ValueError(f"invalid GCS URL {url!r}: use gs://bucket/prefix")
        self.url = url
        self.prefix = parts.path.strip("/") + "/" if parts.path.strip("/") else ""
        if client is None:
            if os.environ.get("STORAGE_EMULATOR_HOST"):
                from google.auth.credentials import AnonymousCredentials

                client = storage.Client(project=project or "fedkeeper", credentials=AnonymousCredentials())
            else:
                from google.auth.exceptions import DefaultCredentialsError

                try:
                    client = storage.Client(project=project)
                except (DefaultCredentialsError, OSError) as exc:
                    raise StoreError(
                        f"no Google credentials for gs://{parts.netloc}: Application Default Credentials found none "
                        "(tried GOOGLE_APPLICATION_CREDENTIALS, gcloud's application-default login and the metadata "
                        "server); run `gcloud auth application-default login`, set GOOGLE_APPLICATION_CREDENTIALS "
                        f"to a service account key, or STORAGE_EMULATOR_HOST for an emulator ({type(exc).__name__})"
                    ) from None
        self.client = client
        self.bucket = client.bucket(parts.netloc)

    @staticmethod
    def _bytes(data) -> bytes:
        # The client library accepts only bytes; encoders may hand over a bytearray.
        return data if isinstance(data, bytes) else bytes(data)

    def _blob(self, key: str) -> storage.Blob:
        return self.bucket.blob(self.prefix + check_key(key))

    def _fail(self, exc: Exception, key: str, op: str) -> Exception:
        if isinstance(exc, gexc.NotFound):
            # A 404 is the object's or the bucket's; ask the bucket (once) instead of reading the message.
            if not self._bucket_exists():
                return StoreError(f"bucket {self.bucket.name!r} does not exist; create it first (gcloud storage buckets create gs://{self.bucket.name})")
            return NotFound(key)
        if isinstance(exc, (gexc.Forbidden, gexc.Unauthorized)):
            return StoreError(f"{op} {key} in gs://{self.bucket.name} was refused; check Application Default "
                              "Credentials (gcloud auth application-default login, or a service account) and its roles")
        if not isinstance(exc, gexc.GoogleAPIError) or isinstance(exc, gexc.RetryError):
            host = os.environ.get("STORAGE_EMULATOR_HOST") or "storage.googleapis.com"
            return StoreError(f"cannot reach GCS at {host} for gs://{self.bucket.name} ({type(exc).__name__}); "
                              "check the network, the credentials, or STORAGE_EMULATOR_HOST and that the emulator runs")
        return StoreError(f"{op} {key} in gs://{self.bucket.name} failed: {exc}")

    def _bucket_exists(self) -> bool:
        if not getattr(self, "_bucket_seen", False):
            try:
                self._bucket_seen = self.bucket.exists()
            except gexc.GoogleAPIError:
                return True  # cannot tell; report the object as missing
        return self._bucket_seen

    def _metadata(self, key: str):
        """The object's metadata (size, generation) without its bytes; raises NotFound."""
        try:
            b = self.bucket.get_blob(self.prefix + check_key(key))
        except gexc.GoogleAPIError as exc:
            raise self._fail(exc, key, "stat") from None
        if b is None:
            raise NotFound(key)
        return b

    def size(self, key: str) -> int:
        """The object's size from its metadata."""
        return int(self._metadata(key).size or 0)

    def version(self, key: str) -> str:
        """The generation from the object's metadata, as get_versioned returns it."""
        return str(self._metadata(key).generation)

    def get_range(self, key: str, start: int, end: int) -> bytes | memoryview:
        """A ranged download of bytes [start, end)."""
        if end <= start:
            return b""
        try:
            return self._blob(key).download_as_bytes(start=int(start), end=int(end) - 1)
        except gexc.GoogleAPIError as exc:
            if getattr(exc, "code", None) == 416:
                return b""
            raise self._fail(exc, key, "get") from None

    def get_view(self, key: str, max_bytes: int | None = None) -> bytes | memoryview:
        """Bytes at key; with max_bytes a ranged download reads at most max_bytes + 1 of them."""
        if max_bytes is None:
            return self.get(key)
        try:
            return self._blob(key).download_as_bytes(start=0, end=int(max_bytes))
        except gexc.GoogleAPIError as exc:
            if getattr(exc, "code", None) == 416:
                return b""
            raise self._fail(exc, key, "get") from None

    def get(self, key: str) -> bytes:
        """Bytes at key."""
        try:
            return self._blob(key).download_as_bytes()
        except _FAILURES as exc:
            raise self._fail(exc, key, "get") from None

    def put(self, key: str, data: bytes) -> None:
        """Upload; GCS makes a new generation visible atomically."""
        try:
            self._blob(key).upload_from_string(self._bytes(data), content_type="application/octet-stream")
        except _FAILURES as exc:
            raise self._fail(exc, key, "put") from None

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Upload with if_generation_match=0, which only succeeds if no live object exists."""
        try:
            self._blob(key).upload_from_string(self._bytes(data), content_type="application/octet-stream", if_generation_match=0)
            return True
        except gexc.PreconditionFailed:
            return False
        except _FAILURES as exc:
            raise self._fail(exc, key, "create") from None

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """Bytes and the generation they came from."""
        blob = self._blob(key)
        try:
            data = blob.download_as_bytes()
        except _FAILURES as exc:
            raise self._fail(exc, key, "get") from None
        return data, str(blob.generation)

    def put_if_match(self, key: str, data: bytes, version: str) -> bool:
        """Upload with if_generation_match=version."""
        try:
            self._blob(key).upload_from_string(self._bytes(data), content_type="application/octet-stream",
                                               if_generation_match=int(version))
            return True
        except (gexc.PreconditionFailed, gexc.NotFound):
            return False
        except _FAILURES as exc:
            raise self._fail(exc, key, "swap") from None

    def list(self, prefix: str = "") -> list[str]:
        """Every key under prefix (the client pages through), sorted."""
        try:
            return sorted(b.name[len(self.prefix):] for b in self.client.list_blobs(self.bucket, prefix=self.prefix + prefix))
        except _FAILURES as exc:
            raise self._fail(exc, prefix, "list") from None

    def delete(self, key: str) -> None:
        """Remove key if present."""
        try:
            self._blob(key).delete()
        except gexc.NotFound:
            pass
        except _FAILURES as exc:
            raise self._fail(exc, key, "delete") from None

    def exists(self, key: str) -> bool:
        """True if key exists."""
        try:
            return self._blob(key).exists()
        except _FAILURES as exc:
            raise self._fail(exc, key, "head") from None

    @staticmethod
    def presign_put_headers(max_bytes: int | None) -> dict[str, str]:
        """Headers a presigned PUT must carry: GCS enforces the signed content-length range."""
        return {"x-goog-content-length-range": f"0,{max_bytes}"} if max_bytes else {}

    def presign(self, key: str, method: str, expires_s: int, max_bytes: int | None = None) -> str:
        """A V4 signed URL for GET or PUT of exactly this key; PUTs may carry a content-length range bound."""
        method = method.upper()
        if method not in ("GET", "PUT"):
            raise ValueError(f"presign supports GET and PUT, not {method}")
        headers = self.presign_put_headers(max_bytes) if method == "PUT" and max_bytes else None
        try:
            return self._blob(key).generate_signed_url(version="v4", expiration=dt.timedelta(seconds=int(expires_s)),
                                                       method=method, headers=headers)
        except (AttributeError, TypeError, ValueError) as exc:
            raise StoreError(f"cannot sign URLs for gs://{self.bucket.name} ({exc}); signed URLs need a service "
                             "account key or the IAM signBlob permission") from None
