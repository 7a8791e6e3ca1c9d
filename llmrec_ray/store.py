"""Object storage addressed by URI: `file:///abs/dir` (or a plain path) and `s3://bucket/prefix`.

Everything llmrec-ray keeps -- shards, catalogue, ledger, registry, checkpoints -- lives under one
store root, addressed by keys relative to it ("interactions/period=1997-09-22/part-0.parquet").

Writes of single objects are atomic: a reader sees the old bytes or the new bytes, never half.
Locally that is write-to-temp + os.replace; on S3 a PUT is atomic by itself. Small JSON objects that
several writers update (the ledger, the promoted pointer) use compare-and-swap: S3 conditional PUT
(`If-Match: <etag>` / `If-None-Match: *`, 412 on conflict) or, locally, a file lock + etag check.
The S3 clients and the one-line explanations of S3 failures are in llmrec_ray/s3.py.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from llmrec_ray.config import StoreConfig
from llmrec_ray.s3 import endpoint_url, explain_error, make_client, make_filesystem, put_if_match


class StoreError(RuntimeError):
    """A store operation failed for a reason the caller should report (bad URI, missing key, ...)."""


class ConflictError(StoreError):
    """A conditional write lost a race: the object changed since it was read."""


@dataclass(frozen=True)
class Versioned:
    """A JSON object together with the etag it was read at (None: the object does not exist)."""

    value: Any
    etag: Optional[str]


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class Store:
    """A store root. Use `Store.from_config(cfg.store)`; keys are '/'-separated and relative."""

    def __init__(self, cfg: StoreConfig):
        self.cfg = cfg
        parsed = urlparse(cfg.uri)
        if parsed.scheme in ("", "file"):
            path = cfg.uri[len("file://"):] if parsed.scheme == "file" else cfg.uri
            self.scheme = "file"
            self.root = str(Path(os.path.expanduser(path)).resolve())
            self.uri = f"file://{self.root}"
        elif parsed.scheme == "s3":
            if not parsed.netloc:
                raise StoreError(f"store.uri={cfg.uri!r} has no bucket; use s3://bucket/prefix")
            self.scheme = "s3"
            self.bucket = parsed.netloc
            self.prefix = parsed.path.strip("/")
            self.root = f"{self.bucket}/{self.prefix}".rstrip("/")
            self.uri = f"s3://{self.root}"
        else:
            raise StoreError(
                f"store.uri={cfg.uri!r} has unsupported scheme {parsed.scheme!r}; use file:///path or s3://bucket/prefix"
            )
        self._fs: Optional[pafs.FileSystem] = None
        self._s3 = None

    @classmethod
    def from_config(cls, cfg: StoreConfig) -> "Store":
        return cls(cfg)

    # --- addressing -------------------------------------------------------------------------------
    def fs_path(self, key: str = "") -> str:
        """Path of `key` for `self.fs` (pyarrow / Ray Data): '/abs/dir/key' or 'bucket/prefix/key'."""
        key = key.strip("/")
        return f"{self.root}/{key}" if key else self.root

    def key_uri(self, key: str = "") -> str:
        return f"{self.scheme}://{self.fs_path(key)}" if self.scheme == "s3" else f"file://{self.fs_path(key)}"

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs = pafs.LocalFileSystem() if self.scheme == "file" else make_filesystem(self.cfg)
        return self._fs

    @property
    def s3(self):
        """A boto3 S3 client (S3 stores only): used for conditional writes, which pyarrow lacks."""
        if self._s3 is None:
            self._s3 = make_client(self.cfg)
        return self._s3

    def _s3_key(self, key: str) -> str:
        key = key.strip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    # --- failing fast, in one line ----------------------------------------------------------------
    def check(self, must_exist: bool = True) -> None:
        """Reads only; raises a one-line StoreError naming the fix unless the store is usable: the S3 endpoint answers,
        accepts the credentials and has the bucket; with must_exist the store also holds something already (the local
        directory exists; the S3 prefix has objects -- S3 has no empty directories). Call it before writing or starting Ray."""
        create = f"create it with `llmrec data import movielens --store {self.uri}`"
        if self.scheme == "file":
            if must_exist and not os.path.isdir(self.root):
                raise StoreError(f"store {self.uri} does not exist: check --store / store.uri, or {create}")
            return
        try:
            found = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "", MaxKeys=1)
        except Exception as exc:
            explained = self.explain(exc)
            if explained is None:
                raise
            raise explained from None
        if must_exist and not found.get("KeyCount"):
            raise StoreError(f"store {self.uri} does not exist (no objects under it at "
                             f"{endpoint_url(self.cfg) or 'AWS'}): check --store / store.uri, or {create}")

    def explain(self, exc: BaseException) -> Optional[StoreError]:
        """The S3 failure behind `exc` (boto3 or pyarrow, possibly wrapped, e.g. by a Ray task) as a one-line StoreError
        naming the problem and the fix; None if `exc` is not one."""
        message = explain_error(exc, self.cfg, self.uri, self.bucket) if self.scheme == "s3" else None
        return StoreError(message) if message else None

    # --- plain objects ----------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.fs.get_file_info(self.fs_path(key)).type == pafs.FileType.File

    def read_bytes(self, key: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.fs_path(key)) as f:
                return f.read()
        except FileNotFoundError:
            raise StoreError(f"{self.key_uri(key)} does not exist") from None

    def read_table(self, key: str, columns: Optional[list[str]] = None) -> pa.Table:
        """A Parquet object (a shard, the catalogue) as an Arrow table; StoreError if it does not exist."""
        return pq.read_table(io.BytesIO(self.read_bytes(key)), columns=columns)

    def num_rows(self, key: str) -> int:
        """Rows of a Parquet object, from its footer (the data pages are not decoded)."""
        with self.fs.open_input_file(self.fs_path(key)) as f:
            return pq.read_metadata(f).num_rows

    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomic: readers see the previous object or this one, never a partial write."""
        if self.scheme == "s3":
            self.s3.put_object(Bucket=self.bucket, Key=self._s3_key(key), Body=data)
            return
        path = Path(self.fs_path(key))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def list(self, prefix: str = "", suffix: str = "") -> list[str]:
        """Keys (relative to the root) of all objects under `prefix`, sorted; temp files excluded."""
        base = self.fs_path(prefix)
        info = self.fs.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            return []
        if info.type == pafs.FileType.File:
            return [prefix.strip("/")]
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        keys = []
        for entry in self.fs.get_file_info(selector):
            if entry.type != pafs.FileType.File or entry.base_name.startswith("."):
                continue
            key = entry.path[len(self.root):].lstrip("/")
            if key.endswith(suffix):
                keys.append(key)
        return sorted(keys)

    def list_versions(self, prefix: str = "", suffix: str = "") -> dict[str, str]:
        """{key: version tag} for the objects `list()` returns, from one listing (no object is read).

        The tag changes whenever an object is rewritten: the S3 ETag, or locally "size:mtime_ns".
        """
        if self.scheme == "file":
            infos = [self.fs.get_file_info(self.fs_path(k)) for k in self.list(prefix, suffix)]
            return {info.path[len(self.root):].lstrip("/"): f"{info.size}:{info.mtime_ns}" for info in infos}
        base = self._s3_key(prefix).rstrip("/")
        strip = len(self.prefix) + 1 if self.prefix else 0
        tags = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{base}/" if base else ""):
            for obj in page.get("Contents", []):
                key = obj["Key"][strip:]
                if key.endswith(suffix) and not key.rsplit("/", 1)[-1].startswith("."):
                    tags[key] = obj["ETag"]
        return dict(sorted(tags.items()))

    def delete(self, key: str) -> None:
        try:
            self.fs.delete_file(self.fs_path(key))
        except FileNotFoundError:
            pass

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)
        if self.scheme == "file":
            shutil.rmtree(self.fs_path(prefix), ignore_errors=True)

    def move(self, src: str, dst: str) -> None:
        """Copy then delete: the object is never absent from both places."""
        self.write_bytes(dst, self.read_bytes(src))
        self.delete(src)

    # --- directories (checkpoints) ----------------------------------------------------------------
    def upload_dir(self, local_dir: str | Path, prefix: str) -> None:
        local_dir = Path(local_dir)
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            self.write_bytes(f"{prefix.strip('/')}/{path.relative_to(local_dir).as_posix()}", path.read_bytes())

    def download_dir(self, prefix: str, local_dir: str | Path) -> Path:
        local_dir = Path(local_dir)
        keys = self.list(prefix)
        if not keys:
            raise StoreError(f"{self.key_uri(prefix)} holds no files")
        for key in keys:
            dst = local_dir / key[len(prefix.strip("/")):].lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(self.read_bytes(key))
        return local_dir

    # --- JSON with compare-and-swap ---------------------------------------------------------------
    def read_json(self, key: str) -> Versioned:
        if self.scheme == "s3":
            try:
                resp = self.s3.get_object(Bucket=self.bucket, Key=self._s3_key(key))
            except self.s3.exceptions.NoSuchKey:
                return Versioned(None, None)
            data = resp["Body"].read()
            return Versioned(self._parse_json(key, data), resp["ETag"])
        path = Path(self.fs_path(key))
        if not path.is_file():
            return Versioned(None, None)
        data = path.read_bytes()
        return Versioned(self._parse_json(key, data), _md5(data))

    def _parse_json(self, key: str, data: bytes) -> Any:
        try:
            return json.loads(data)
        except json.JSONDecodeError as exc:
            raise StoreError(f"{self.key_uri(key)} is not valid JSON ({exc}); restore it from a backup") from None

    def put_json(self, key: str, value: Any, expected_etag: Optional[str]) -> str:
        """Write `value` only if the object is still at `expected_etag` (None: must not exist yet).

        Returns the new etag; raises ConflictError if another writer got there first.
        """
        data = json.dumps(value, indent=2, sort_keys=True).encode()
        if self.scheme == "s3":
            etag = put_if_match(self.s3, self.bucket, self._s3_key(key), data, expected_etag)
        else:
            etag = self._put_if_match_local(key, data, expected_etag)
        if etag is None:
            raise ConflictError(f"{self.key_uri(key)} changed since it was read (expected etag {expected_etag}); "
                                "another writer won -- re-read it and retry")
        return etag

    def _put_if_match_local(self, key: str, data: bytes, expected_etag: Optional[str]) -> Optional[str]:
        """put_if_match on a local file: a file lock makes the etag check and the write one step."""
        path = Path(self.fs_path(key))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (_md5(path.read_bytes()) if path.is_file() else None) != expected_etag:
                return None
            self.write_bytes(key, data)
        return _md5(data)
