"""Model registry in the store.

Layout, per version:
  registry/versions/<vNNNN>/claim.json    written first, create-if-absent: whoever writes it owns the name
  registry/versions/<vNNNN>/model/        the export directory, uploaded only by the name's owner
  registry/versions/<vNNNN>/version.json  written last; a version exists for readers once this exists. Its
                                         model_sha256 (of the model files) keys local caches by content, and
                                         every download is checked against it (download_model)
and the pointer registry/promoted.json = {"version", "model_prefix", "history", "updated_at", "log"}, written only
by compare-and-swap. A round promotes with `expected_parent`: the swap succeeds only while the promoted version is
still the one the round trained from, so of two rounds racing from the same parent exactly one promotes.

A name that is claimed but has no version.json is a registration in progress or one whose writer crashed: it is
never listed, shown, promoted or pruned, and its name is never reused (its partial files stay until deleted by
hand). Versions registered before claims existed have no claim.json and read as usual.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from llmrec_ray.store import ConflictError, Store, Versioned

PREFIX = "registry/versions"
PROMOTED_KEY = "registry/promoted.json"  # the pointer; its one format: _pointer()


class RegistryError(RuntimeError):
    pass


class PromotionConflict(RegistryError):
    """The promoted pointer no longer names the parent a round started from: another writer promoted first."""

    def __init__(self, version: str, expected_parent: Optional[str], promoted: Optional[str]):
        self.version, self.expected_parent, self.promoted = version, expected_parent, promoted
        super().__init__(
            f"not promoting {version}: the promoted version is now {promoted or 'none'}, not its parent "
            f"{expected_parent or 'none (first model)'} -- another round or `llmrec models promote` won the race; "
            f"{version} stays registered, unpromoted")


class _AnyParent:
    def __repr__(self) -> str:
        return "ANY_PARENT"


ANY_PARENT: Any = _AnyParent()  # promote(expected_parent=ANY_PARENT): promote whatever is promoted now (the CLI)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:
        return None


def dir_sha256(path: str | Path) -> str:
    """sha256 over every file of a directory (relative path, size, bytes; in path order): a model export's identity."""
    path, digest = Path(path), hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(path).as_posix()}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def version_key(version: str) -> str:
    return f"{PREFIX}/{version}/version.json"


def claim_key(version: str) -> str:
    return f"{PREFIX}/{version}/claim.json"


def model_prefix(version: str) -> str:
    return f"{PREFIX}/{version}/model"


def _pointer(current: dict, version: str, history: list[str], op: dict) -> dict:
    """registry/promoted.json naming `version`: `op` is appended to the current pointer's log (the last 100 kept).
    Readers (Serve) need version, model_prefix, history."""
    log = [*current.get("log", []), {**op, "version": version, "at": _now()}][-100:]
    return {"version": version, "model_prefix": model_prefix(version), "history": history, "updated_at": _now(), "log": log}


class Registry:
    def __init__(self, store: Store, keep_versions: int = 10):
        self.store = store
        self.keep_versions = keep_versions

    # --- reading ----------------------------------------------------------------------------------
    def promoted(self) -> Optional[Versioned]:
        v = self.store.read_json(PROMOTED_KEY)
        return v if v.value is not None else None

    def promoted_version(self) -> Optional[str]:
        p = self.promoted()
        return p.value["version"] if p else None

    def promoted_model_uri(self) -> Optional[str]:
        p = self.promoted()
        return self.store.key_uri(p.value["model_prefix"]) if p else None

    def download_model(self, version: str, local_dir: str | Path, prefix: Optional[str] = None) -> None:
        """The version's model files into local_dir, checked against the model_sha256 recorded at registration (versions
        are never rewritten after it): RegistryError when they differ, e.g. a file damaged or replaced in the store,
        which could otherwise load and serve wrong scores. prefix: where the pointer says the files are."""
        info = self.store.read_json(version_key(version)).value or {}
        self._download_checked(version, prefix or model_prefix(version), local_dir, info.get("model_sha256"))

    def _download_checked(self, version: str, prefix: str, local_dir: str | Path, expected: Optional[str]) -> None:
        """download_model with the version's recorded model_sha256 already read (None: a version registered before the
        checksum was recorded, not checked)."""
        self.store.download_dir(prefix, local_dir)
        if expected and dir_sha256(local_dir) != expected:
            raise RegistryError(f"{version}: the model files under {self.store.key_uri(prefix)} do not match the "
                                "checksum recorded when it was registered (model_sha256): the stored copy is damaged or "
                                "was changed; promote another version (`llmrec models rollback` or `llmrec models "
                                "promote vNNNN`)")

    def _names(self, *files: str) -> list[str]:
        """Version names that hold any of `files` directly under registry/versions/<name>/, sorted."""
        names = {k[len(PREFIX) + 1:].split("/")[0] for k in self.store.list(PREFIX)
                 if k.count("/") == PREFIX.count("/") + 2 and k.rsplit("/", 1)[1] in files}
        return sorted(n for n in names if n.startswith("v"))

    def versions(self) -> list[str]:
        """Complete versions (version.json written); claimed names still uploading, or abandoned, are left out."""
        return self._names("version.json")

    def show(self, version: str) -> dict:
        v = self.store.read_json(version_key(version))
        if v.value is None:
            if self.store.read_json(claim_key(version)).value is not None:
                raise RegistryError(f"version {version!r} is claimed but not complete: it is being registered, or its "
                                    f"writer crashed (complete versions: {self.versions()})")
            raise RegistryError(f"no version {version!r} in the registry (known: {self.versions()})")
        return v.value

    def list(self) -> list[dict]:
        return [self.show(v) for v in self.versions()]

    def lineage(self, version: Optional[str]) -> set[str]:
        out: set[str] = set()
        while version and version not in out:
            out.add(version)
            version = self.show(version).get("parent")
        return out

    def trained_shards(self, version: Optional[str]) -> set[str]:
        """Every shard that `version` or one of its ancestors was trained on."""
        return {s for v in self.lineage(version) for s in self.show(v).get("shards", [])}

    def lineage_of_promoted(self) -> set[str]:
        return self.lineage(self.promoted_version())

    def model_dir(self, version: str, cache_dir: str | Path) -> Path:
        """The version's model files, downloaded once into cache_dir/<version>-<content key>.

        The key is the model_sha256 recorded at registration (older versions: the etag of their version.json), never
        the name alone: a store recreated at the same path (`make clean && make demo`) has another v0001, and its
        files must not come from the old one's cache entry. Entries of other content under the same name are removed.
        Downloads, and the entry when it is reused, are checked against model_sha256 (download_model)."""
        v = self.store.read_json(version_key(version))
        if v.value is None:
            self.show(version)  # raises RegistryError (in progress, or no such version) unless it was written meanwhile
            v = self.store.read_json(version_key(version))
        expected = v.value.get("model_sha256")
        key = expected or hashlib.sha256(str(v.etag).encode()).hexdigest()
        cache_dir = Path(cache_dir)
        dst = cache_dir / f"{version}-{key[:16]}"
        # a reused entry is checked too (0.1 s for a 105 MB MiniLM export): one damaged on this disk is downloaded again
        if not (dst / "config.json").is_file() or (expected and dir_sha256(dst) != expected):
            for stale in [cache_dir / version, *cache_dir.glob(f"{version}-*")]:  # cache_dir/<version>: the old layout
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(dir=cache_dir))
            try:
                self._download_checked(version, model_prefix(version), tmp, expected)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(dst, ignore_errors=True)
            try:
                tmp.rename(dst)
            except OSError:  # another process filled the same entry meanwhile: same content, keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
        return dst

    # --- writing ----------------------------------------------------------------------------------
    def next_version(self) -> str:
        """The name after every claimed or complete one (a first guess: `_claim` settles races)."""
        vs = self._names("version.json", "claim.json")
        return f"v{(int(vs[-1][1:]) + 1 if vs else 1):04d}"

    def _claim(self, version: Optional[str], max_tries: int = 1000) -> str:
        """Own a version name: create-if-absent of its claim.json. A lost race tries the next name."""
        name = version or self.next_version()
        for _ in range(max_tries):
            claim = {"version": name, "claimed_at": _now(), "host": socket.gethostname(), "pid": os.getpid(),
                     "token": uuid.uuid4().hex}
            try:
                self.store.put_json(claim_key(name), claim, None)
                taken = self.store.read_json(version_key(name)).value is not None  # a version registered before claims
            except ConflictError:
                taken = True  # claims are never released: each lost race is another's name
            if not taken:
                return name
            if version:
                raise ConflictError(f"version {version} is already claimed or registered; ask for no name to get the next")
            name = f"v{int(name[1:]) + 1:04d}"
        raise RegistryError(f"could not claim a version name after {max_tries} tries (too many concurrent writers)")

    def create_version(self, export_dir: str | Path, *, parent: Optional[str], shards: list[str], config: dict | None = None,
                       metrics: dict | None = None, gate: dict | None = None, extra: dict | None = None,
                       version: Optional[str] = None, before_upload: Optional[Callable[[Path, str], None]] = None) -> str:
        """Claim a name, upload the whole export directory under it, then write version.json. Returns the name.

        Concurrent writers get distinct names and each version holds only its own writer's files. `version` asks
        for that exact name (ConflictError if it is taken). before_upload(export_dir, name): adds files that need
        the name (the item index) once it is claimed."""
        name = self._claim(version)
        if before_upload is not None:
            before_upload(Path(export_dir), name)
        self.store.delete_prefix(model_prefix(name))  # files of a pre-claim writer that crashed mid-upload
        self.store.upload_dir(export_dir, model_prefix(name))
        info = {"version": name, "parent": parent, "shards": list(shards), "config": config or {},
                "metrics": metrics or {}, "gate": gate or {}, "created_at": _now(), "git_commit": git_commit(),
                "model_sha256": dir_sha256(export_dir), **(extra or {})}
        try:
            self.store.put_json(version_key(name), info, None)
        except ConflictError:
            raise RegistryError(f"{version_key(name)} was written by a writer that did not claim {name} "
                                "(an older llmrec?); the files under it may be mixed -- do not promote it") from None
        return name

    def check_loadable(self, version: str) -> None:
        from llmrec_ray.model import load_export  # here: torch + transformers cost seconds; nothing else needs them

        with tempfile.TemporaryDirectory() as tmp:
            self.download_model(version, tmp)
            load_export(tmp)

    def promote(self, version: str, expected_etag: Optional[str] = None, *, expected_parent: Any = ANY_PARENT,
                _history_op: str = "promote") -> str:
        """Point registry/promoted.json at `version`. Refuses NaN metrics or an export that does not load.

        The write is a compare-and-swap. expected_parent: promote only while the pointer names this version
        (None: nothing promoted yet), else PromotionConflict; a concurrent write that leaves it there is retried.
        ANY_PARENT (the default, `llmrec models promote`) swaps against whatever was just read. expected_etag:
        swap against exactly that etag (ConflictError if the pointer changed)."""
        try:
            json.dumps(self.show(version).get("metrics", {}), allow_nan=False)  # ValueError on NaN or an infinity
        except ValueError:
            raise RegistryError(f"refusing to promote {version}: its metrics contain NaN/inf") from None
        try:
            self.check_loadable(version)
        except ValueError as exc:
            raise RegistryError(f"refusing to promote {version}: {exc}") from None
        for _ in range(20):
            cur = self.store.read_json(PROMOTED_KEY)
            current = cur.value or {}
            if expected_parent is not ANY_PARENT and current.get("version") != expected_parent:
                raise PromotionConflict(version, expected_parent, current.get("version"))
            ptr = _pointer(current, version, [*current.get("history", []), version], {"op": _history_op})
            try:
                self.store.put_json(PROMOTED_KEY, ptr, cur.etag if expected_etag is None else expected_etag)
                return version
            except ConflictError:
                if expected_etag is not None or expected_parent is ANY_PARENT:
                    raise
                # the pointer changed between read and write: re-read; PromotionConflict if it left the parent
        raise RegistryError(f"could not promote {version}: registry/promoted.json kept changing (20 tries)")

    def rollback(self) -> str:
        """Re-point to the version promoted before the current one; nothing is deleted, the rollback is logged."""
        cur = self.store.read_json(PROMOTED_KEY)
        if cur.value is None:
            raise RegistryError("nothing is promoted; nothing to roll back")
        history = list(cur.value.get("history", []))
        current = cur.value["version"]
        previous = [v for v in history[:-1] if v != current]
        if not previous:
            raise RegistryError(f"{current} is the only promoted version; nothing to roll back to")
        target = previous[-1]
        # history is the stack of effective promotions: drop the current entry, keep it in the log
        new_history = history[:-1]
        while new_history and new_history[-1] != target:
            new_history.pop()
        self.store.put_json(PROMOTED_KEY, _pointer(cur.value, target, new_history, {"op": "rollback", "from": current}),
                            cur.etag)
        return target

    def retain(self, keep_versions: Optional[int] = None) -> list[str]:
        """Delete model files of old versions that are not promoted, not in the promoted lineage nor history, beyond the
        newest `keep_versions`. version.json stays. Returns the versions pruned."""
        keep = keep_versions if keep_versions is not None else self.keep_versions
        p = self.promoted()
        protected = self.lineage_of_promoted() | set((p.value.get("history", []) if p else []))
        vs = self.versions()
        recent = set(vs[-keep:])
        pruned = []
        for v in vs:
            if v not in protected and v not in recent and self.store.list(model_prefix(v)):
                self.store.delete_prefix(model_prefix(v))
                pruned.append(v)
        return pruned
