"""Store backends behind one interface; cloud SDKs load only when their URL scheme is used."""

from __future__ import annotations

from fedkeeper.store.base import InvalidKey, MissingExtra, NotFound, Store, StoreError, TooLarge


def open_store(url: str, **options) -> Store:
    """Open the store at a folder path, file://, s3://bucket/prefix or gs://bucket/prefix."""
    if not isinstance(url, str) or not url:
        raise ValueError("store URL is empty: pass a folder, s3://bucket/prefix or gs://bucket/prefix")
    if url.startswith("s3://"):
        try:
            from fedkeeper.store.s3 import S3Store
        except ImportError as exc:
            raise MissingExtra(f"s3:// stores need boto3 ({exc}); install it with: pip install 'fedkeeper[aws]'") from exc
        return S3Store(url, **options)
    if url.startswith("gs://"):
        try:
            from fedkeeper.store.gcs import GCSStore
        except ImportError as exc:
            raise MissingExtra(f"gs:// stores need google-cloud-storage ({exc}); install it with: pip install 'fedkeeper[gcp]'") from exc
        return GCSStore(url, **options)
    if "://" in url and not url.startswith("file://"):
        raise ValueError(f"unsupported store URL {url!r}: use a folder, s3://bucket/prefix or gs://bucket/prefix")
    from fedkeeper.store.local import LocalStore

    return LocalStore(url[len("file://"):] if url.startswith("file://") else url)


__all__ = ["open_store", "Store", "NotFound", "StoreError", "MissingExtra", "InvalidKey"]
