"""Opening a stage's local RocksDB (rocksdict) store: raw bytes in and out, created when missing."""

from __future__ import annotations

from pathlib import Path

from rocksdict import Options, Rdict


def open_db(path: Path) -> Rdict:
    path.parent.mkdir(parents=True, exist_ok=True)
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    return Rdict(str(path), options)


def recreate_db(db: Rdict, path: Path) -> Rdict:
    """Close `db`, delete its files and open an empty one in their place."""
    db.close()
    Rdict.destroy(str(path))
    return open_db(path)
