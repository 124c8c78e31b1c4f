"""Run-directory layout, atomic writes and the manifest."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_file(path: Path) -> tuple[int, str]:
    """A temporary file beside `path` with the mode a plain open() would give it (mkstemp
    makes 0600 files, which colleagues could not read once renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())
    return fd, tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def strict_json(obj: Any) -> Any:
    """`obj` with every non-finite float spelled as the string "inf", "-inf" or "nan": JSON
    has no Infinity, and other tools refuse a file that writes it (the config accepts the
    strings back for its float fields)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def _from_strict(obj: Any) -> Any:
    if isinstance(obj, str) and obj in ("inf", "-inf", "nan"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _from_strict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_strict(v) for v in obj]
    return obj


def read_json(path: str | Path) -> Any:
    """A JSON file written by `atomic_write_json`, its "inf" / "-inf" / "nan" back as floats."""
    return _from_strict(json.loads(Path(path).read_text()))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON (`strict_json`), keys sorted, written atomically."""
    atomic_write_text(path, json.dumps(strict_json(obj), indent=2, sort_keys=True, default=str,
                                       allow_nan=False) + "\n")


def atomic_write_frame(path: str | Path, frame) -> None:
    """Write a pandas DataFrame as .csv or .parquet atomically."""
    path = Path(path)
    fd, tmp = _temp_file(path)
    os.close(fd)
    try:
        if path.suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a finished temporary folder into place, replacing an older one."""
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_dir, final_dir)


def stable_hash(obj: Any) -> str:
    """A short hash of a JSON-serialisable object, independent of key order."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class RunDir:
    """Paths inside `runs/<name>/`."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def data(self, split: str) -> Path:
        return self.root / "data" / f"{split}.jsonl"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    def model(self, model_id: str) -> Path:
        return self.root / "models" / model_id

    def stats(self, model_id: str, which: str | None = None) -> Path:
        suffix = f".{which}" if which else ""
        return self.root / "scores" / f"{model_id}{suffix}.stats.npz"

    def scores(self, model_id: str) -> Path:
        return self.root / "scores" / f"{model_id}.parquet"

    # private/: per-record generations and answers in clear (token ids decode to text);
    # unlike scores/, tables/ and report/, never for sharing
    def generations(self, model_id: str) -> Path:
        return self.root / "private" / f"{model_id}.generations.parquet"

    def responses(self, model_id: str) -> Path:
        return self.root / "private" / f"{model_id}.responses.parquet"

    def private_log(self, model_id: str) -> Path:
        """A DP model's training log: losses on private batches, without noise."""
        return self.root / "private" / f"{model_id}.train_log.jsonl"

    def privacy(self, model_id: str) -> Path:
        return self.root / "scores" / f"{model_id}.privacy.json"

    def table(self, name: str) -> Path:
        return self.root / "tables" / f"{name}.csv"

    @property
    def report(self) -> Path:
        return self.root / "report"


class Manifest:
    """manifest.json: config, versions, seed, and per stage its status, input hash and timing."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data: dict[str, Any] = {"stages": {}}
        if self.path.exists():
            try:
                self.data = read_json(self.path)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}: manifest is not valid JSON ({e}); "
                                 f"delete it to start the run afresh") from None
            self.data.setdefault("stages", {})

    def is_done(self, stage: str, input_hash: str) -> bool:
        s = self.data["stages"].get(stage)
        return bool(s) and s.get("status") == "done" and s.get("input_hash") == input_hash

    def mark(self, stage: str, *, status: str, input_hash: str, **info: Any) -> None:
        self.data["stages"][stage] = {"status": status, "input_hash": input_hash, **info}
        self.save()

    def stage(self, stage: str) -> dict[str, Any]:
        return self.data["stages"].get(stage, {})

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


LOCK_FILE = ".kdaudit.lock"


class FolderLock:
    """One kdaudit process at a time per output folder: an exclusive `flock` on
    `<folder>/.kdaudit.lock`, holding the owner's pid. The kernel drops the lock when its
    process exits, however it dies, so a killed run never leaves a stale lock behind.

        with FolderLock(run_dir):
            ...   # a second process gets FolderBusyError naming this one's pid
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    def __enter__(self) -> "FolderLock":
        import fcntl

        from kdaudit.errors import ConfigError, FolderBusyError

        self._created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:        # checked before any work, so nothing computed is lost
            raise ConfigError(f"{self.folder}: cannot write the output here "
                              f"({e.strerror}); choose another output folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderBusyError(f"{self.folder}: another kdaudit run (pid {owner}) is using "
                                  f"this folder; wait for it to finish or choose another "
                                  f"output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)       # closing the descriptor releases the flock
            self._fd = None
            # a command that failed before writing anything leaves no folder behind
            if self._created and [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:
                (self.folder / LOCK_FILE).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self.folder.rmdir()
