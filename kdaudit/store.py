"""Run-directory layout, atomic writes and the manifest."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_frame(path: str | Path, frame) -> None:
    """Write a pandas DataFrame as .csv or .parquet atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
                self.data = json.loads(self.path.read_text())
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
