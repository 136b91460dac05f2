"""Shard files on disk: atomic writing with a manifest, and shard specs expanded to URL lists."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Self

import webdataset as wds

from dlip_ds.config import ConfigError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class ShardSink:
    """`webdataset.ShardWriter` into `{prefix}-%06d.tar`, each shard written under a hidden temporary
    name and renamed when complete, so a half-written shard never carries a final name. `close`
    writes `manifest.json` (per-shard counts, total under "samples", plus `info`) and removes shards
    of this prefix left over from an earlier, larger run."""

    def __init__(self, out_dir: str | os.PathLike, *, prefix: str = "shard", shard_size: int = 1000,
                 info: dict | None = None, mtime: float | None = None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.info = dict(info or {})
        self.shards: list[dict] = []
        self._writer: wds.ShardWriter | None = None
        self._shard_size = shard_size
        self._aborted = False
        self._mtime = mtime  # fixed: byte-identical shards for identical content

    def write(self, sample: dict) -> None:
        if self._writer is None:  # opened lazily: an empty run writes no empty shard
            pattern = str(self.out / f".{self.prefix}-%06d.tar.tmp")
            self._writer = wds.ShardWriter(pattern, maxcount=self._shard_size, post=self._publish, verbose=0,
                                           mtime=self._mtime)
        self._writer.write(sample)

    def _publish(self, tmp_name: str) -> None:
        if self._aborted:
            os.unlink(tmp_name)
            return
        final = Path(tmp_name).name[1:-len(".tmp")]
        os.replace(tmp_name, self.out / final)
        self.shards.append({"name": final, "samples": self._writer.count})

    def close(self) -> dict:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        names = {s["name"] for s in self.shards}
        for stale in self.out.glob(f"{self.prefix}-*.tar"):
            if stale.name not in names and re.fullmatch(rf"{re.escape(self.prefix)}-\d{{6}}\.tar", stale.name):
                log.info("removing %s left over from an earlier run", stale)
                stale.unlink()
        manifest = {"samples": sum(s["samples"] for s in self.shards), "shards": self.shards, **self.info}
        write_json_atomic(self.out / MANIFEST, manifest)
        return manifest

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:  # a failed run publishes nothing and leaves no temporary file
            self._aborted = True
            self._writer.close()


def read_manifest(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def is_remote(spec: str) -> bool:
    """A spec webdataset opens itself (pipe:, file:, any scheme://), not a local path we can check."""
    return spec.startswith(("pipe:", "file:")) or "://" in spec


def check_local_shards(spec, field_name: str) -> None:
    """Fail before training on local shard specs that point at nothing; URLs and brace patterns are
    left to `expand_shards`, which checks each local file it expands to."""
    for s in spec if isinstance(spec, list) else [spec]:
        s = str(s)
        if s and not is_remote(s) and "{" not in s and not Path(s).exists():
            raise ConfigError(f"{field_name}: no such file or directory: {s}")


def shard_folder(spec: str) -> Path:
    """The local folder of a shard spec: the directory itself, else the first shard's folder (a brace
    pattern or `::` list). `dlip-ds synth` writes tokenizer/ and answer_list.json beside its splits' folders."""
    path = Path(spec)
    return path if path.is_dir() else Path(wds.shardlists.expand_urls(spec)[0]).parent


def expand_shards(spec: str | os.PathLike) -> list[str]:
    """One source -> shard URLs: a directory (its manifest's shards, else its *.tar), a brace
    pattern, a `::`-joined list, a `pipe:` command or a URL. Local files must exist."""
    spec = str(spec)
    if not spec:
        raise ConfigError("shards: empty shard spec")
    if not is_remote(spec) and Path(spec).is_dir():
        manifest = read_manifest(spec)
        if manifest is not None:
            urls = [str(Path(spec) / s["name"]) for s in manifest["shards"]]
        else:
            urls = sorted(str(p) for p in Path(spec).glob("*.tar"))
        if not urls:
            raise ConfigError(f"shards: directory {spec} holds no .tar shards")
        return urls
    urls = wds.shardlists.expand_urls(spec)
    missing = [u for u in urls if not is_remote(u) and not Path(u).exists()]
    if missing:
        raise ConfigError(f"shards: {len(missing)} of {len(urls)} local shards do not exist, e.g. {missing[0]}")
    return urls

