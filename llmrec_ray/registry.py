"""Model registry in the store.

Layout: registry/versions/<vNNNN>/model/ (HF export), registry/versions/<vNNNN>/version.json, and the pointer
registry/promoted.json = {"version", "model_prefix", "history", "updated_at"} written only by compare-and-swap.
"""
from __future__ import annotations

import datetime as _dt
import math
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

from llmrec_ray.store import ConflictError, Store, Versioned

PREFIX = "registry/versions"
PROMOTED_KEY = "registry/promoted.json"


class RegistryError(RuntimeError):
    pass


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:
        return None


def _has_nan(obj: Any) -> bool:
    if isinstance(obj, float):
        return math.isnan(obj) or math.isinf(obj)
    if isinstance(obj, dict):
        return any(_has_nan(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_nan(v) for v in obj)
    return False


def version_key(version: str) -> str:
    return f"{PREFIX}/{version}/version.json"


def model_prefix(version: str) -> str:
    return f"{PREFIX}/{version}/model"


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

    def versions(self) -> list[str]:
        names = {k[len(PREFIX) + 1:].split("/")[0] for k in self.store.list(PREFIX, suffix="version.json")}
        return sorted(n for n in names if n.startswith("v"))

    def show(self, version: str) -> dict:
        v = self.store.read_json(version_key(version))
        if v.value is None:
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
        dst = Path(cache_dir) / version
        if not (dst / "config.json").is_file():
            tmp = Path(tempfile.mkdtemp(dir=cache_dir))
            self.store.download_dir(model_prefix(version), tmp)
            shutil.rmtree(dst, ignore_errors=True)
            tmp.rename(dst)
        return dst

    # --- writing ----------------------------------------------------------------------------------
    def next_version(self) -> str:
        vs = self.versions()
        return f"v{(int(vs[-1][1:]) + 1 if vs else 1):04d}"

    def create_version(self, export_dir: str | Path, *, parent: Optional[str], shards: list[str], config: dict | None = None,
                       metrics: dict | None = None, gate: dict | None = None, extra: dict | None = None,
                       version: Optional[str] = None) -> str:
        """Upload the export, then write version.json (CAS: must not exist). Returns the version name."""
        for _ in range(5):
            name = version or self.next_version()
            self.store.upload_dir(export_dir, model_prefix(name))
            info = {"version": name, "parent": parent, "shards": list(shards), "config": config or {},
                    "metrics": metrics or {}, "gate": gate or {}, "created_at": _now(), "git_commit": git_commit(),
                    **(extra or {})}
            try:
                self.store.put_json(version_key(name), info, None)
                return name
            except ConflictError:
                if version:
                    raise
        raise RegistryError("could not allocate a version name (too many concurrent writers)")

    def check_loadable(self, version: str) -> None:
        from llmrec_ray.model import load_export

        with tempfile.TemporaryDirectory() as tmp:
            self.store.download_dir(model_prefix(version), tmp)
            load_export(tmp)

    def promote(self, version: str, expected_etag: Optional[str] = None, *, _history_op: str = "promote") -> str:
        """Point registry/promoted.json at `version` (CAS against expected_etag; None = the etag read now). Refuses NaN metrics or an export that does not load."""
        info = self.show(version)
        if _has_nan(info.get("metrics", {})):
            raise RegistryError(f"refusing to promote {version}: its metrics contain NaN/inf")
        try:
            self.check_loadable(version)
        except ValueError as exc:
            raise RegistryError(f"refusing to promote {version}: {exc}") from None
        cur = self.store.read_json(PROMOTED_KEY)
        current, etag = cur.value, (cur.etag if expected_etag is None else expected_etag)
        history = list((current or {}).get("history", []))
        history.append(version)
        ops = list((current or {}).get("log", []))
        ops.append({"op": _history_op, "version": version, "at": _now()})
        ptr = {"version": version, "model_prefix": model_prefix(version), "history": history, "updated_at": _now(),
               "log": ops[-100:]}
        self.store.put_json(PROMOTED_KEY, ptr, etag)
        return version

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
        ops = list(cur.value.get("log", []))
        ops.append({"op": "rollback", "from": current, "version": target, "at": _now()})
        ptr = {"version": target, "model_prefix": model_prefix(target), "history": new_history, "updated_at": _now(),
               "log": ops[-100:]}
        self.store.put_json(PROMOTED_KEY, ptr, cur.etag)
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
            if v in protected or v in recent:
                continue
            if self.store.list(model_prefix(v)):
                self.store.delete_prefix(model_prefix(v))
                pruned.append(v)
        return pruned
