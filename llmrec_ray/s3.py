"""The S3 side of the store (llmrec_ray/store.py): clients built from StoreConfig, and S3 failures -- from boto3 or
pyarrow, possibly wrapped by a Ray task -- told in one line that names the fix.

Endpoint: store.endpoint_url, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS. Credentials: the store's keys
when both are set, else the standard AWS chain (environment, profiles, instance roles).
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional
from urllib.parse import urlparse

import pyarrow.fs as pafs

from llmrec_ray.config import StoreConfig

_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                    "InvalidClientTokenId", "AuthorizationHeaderMalformed"}
# pyarrow's S3 errors carry the AWS SDK's error name: "... AWS Error ACCESS_DENIED during HeadObject operation ..."
_PYARROW_CODES = {"ACCESS_DENIED": "AccessDenied", "INVALID_ACCESS_KEY_ID": "InvalidAccessKeyId",
                  "SIGNATURE_DOES_NOT_MATCH": "SignatureDoesNotMatch", "NO_SUCH_BUCKET": "NoSuchBucket",
                  "NETWORK_CONNECTION": "Unreachable", "EXPIRED_TOKEN": "ExpiredToken"}
KEYS_HINT = "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or store.access_key_id/store.secret_access_key"


def endpoint_url(cfg: StoreConfig) -> Optional[str]:
    return cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def make_filesystem(cfg: StoreConfig) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem (reads, listings, Ray Data)."""
    kwargs: dict[str, Any] = {"region": cfg.region}
    url = endpoint_url(cfg)
    if url:
        parsed = urlparse(url)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if cfg.access_key_id and cfg.secret_access_key:
        kwargs["access_key"] = cfg.access_key_id
        kwargs["secret_key"] = cfg.secret_access_key
    return pafs.S3FileSystem(**kwargs)


def make_client(cfg: StoreConfig):
    """A boto3 S3 client: for writes and conditional writes, which pyarrow lacks."""
    import boto3  # imported on use: local stores never need it (~0.3 s)

    kwargs: dict[str, Any] = {"region_name": cfg.region}
    if endpoint_url(cfg):
        kwargs["endpoint_url"] = endpoint_url(cfg)
    if cfg.access_key_id and cfg.secret_access_key:
        kwargs["aws_access_key_id"] = cfg.access_key_id
        kwargs["aws_secret_access_key"] = cfg.secret_access_key
    return boto3.client("s3", **kwargs)


def error_code(exc: Optional[BaseException]) -> Optional[str]:
    """The S3 error code of `exc` or of an exception it wraps: the service's code (InvalidAccessKeyId, NoSuchBucket,
    ...), "NoCredentials", "Unreachable" (no connection to the endpoint), or None."""
    from botocore import exceptions as bex  # on use, as boto3 above

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, bex.ClientError):
            return str(exc.response.get("Error", {}).get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
        if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
            return "NoCredentials"
        if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ConnectionClosedError)):
            return "Unreachable"
        if isinstance(exc, OSError):
            match = re.search(r"AWS Error ([A-Z_]+)", str(exc))
            if match and match.group(1) in _PYARROW_CODES:
                return _PYARROW_CODES[match.group(1)]
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__  # `cause`: a RayTaskError's
    return None


def explain_error(exc: BaseException, cfg: StoreConfig, uri: str, bucket: str) -> Optional[str]:
    """The S3 failure behind `exc` as one line naming the problem and the fix; None if `exc` is not one."""
    code = error_code(exc)
    if code is None:
        return None
    where = endpoint_url(cfg) or "the AWS default endpoint"
    if code in _BAD_CREDENTIALS:
        return f"S3 rejected the credentials for {uri} at {where} ({code}): check {KEYS_HINT}"
    if code == "NoCredentials":
        return f"no S3 credentials found for {uri}: set {KEYS_HINT}"
    if code in ("AccessDenied", "403", "Forbidden"):
        return (f"S3 denied access to {uri} at {where} ({code}): check the credentials ({KEYS_HINT}) "
                f"and that they may read and write bucket {bucket!r}")
    if code in ("NoSuchBucket", "404"):
        return (f"S3 bucket {bucket!r} does not exist at {where}: create it (e.g. `aws s3 mb s3://{bucket}`) "
                "or fix store.uri / store.endpoint_url")
    if code == "Unreachable":
        return (f"cannot reach the S3 endpoint {where} for {uri} (connection failed): check "
                "store.endpoint_url / AWS_ENDPOINT_URL and that the server is running")
    return None


def put_if_match(client, bucket: str, key: str, data: bytes, expected_etag: Optional[str]) -> Optional[str]:
    """A conditional PUT (If-Match: expected_etag; If-None-Match: * when it is None): the new ETag, or None when the
    object changed meanwhile (412 / 409)."""
    from botocore.exceptions import ClientError  # on use, as boto3 above

    cond = {"IfNoneMatch": "*"} if expected_etag is None else {"IfMatch": expected_etag}
    try:
        return client.put_object(Bucket=bucket, Key=key, Body=data, **cond)["ETag"]
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412) or \
                code in ("PreconditionFailed", "ConditionalRequestConflict"):
            return None
        raise
