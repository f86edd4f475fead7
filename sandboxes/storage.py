"""Where event screenshots are kept: files in the data dir (one machine), or rows in the
database (several web replicas: each serves what any of them stored). Chosen by
NAMEK_MEDIA_STORAGE; both can remove a whole folder (``delete_tree``) when a sandbox's
records are pruned."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

from django.core.files.base import File
from django.core.files.storage import FileSystemStorage, Storage
from django.utils.deconstruct import deconstructible

from sandboxes.models import StoredFile


@deconstructible
class FileStorage(FileSystemStorage):
    def delete_tree(self, prefix: str) -> None:
        path = Path(self.path(prefix))
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)


@deconstructible
class DatabaseStorage(Storage):
    def _open(self, name: str, mode: str = "rb") -> File[Any]:
        if "w" in mode or "a" in mode:
            raise ValueError("database files are written with save()")
        row = StoredFile.objects.filter(name=name).values_list("content", flat=True).first()
        if row is None:
            raise FileNotFoundError(name)
        return File(io.BytesIO(bytes(row)), name=name)

    def _save(self, name: str, content: File[Any]) -> str:
        content.seek(0)
        data = content.read()
        data = data.encode() if isinstance(data, str) else data
        StoredFile.objects.create(name=name, content=data, size=len(data))
        return name

    def delete(self, name: str) -> None:
        StoredFile.objects.filter(name=name).delete()

    def exists(self, name: str) -> bool:
        return StoredFile.objects.filter(name=name).exists()

    def size(self, name: str) -> int:
        size = StoredFile.objects.filter(name=name).values_list("size", flat=True).first()
        if size is None:
            raise FileNotFoundError(name)
        return int(size)

    def url(self, name: str | None) -> str:
        raise NotImplementedError("stored files are served by Namek's views, which check access")

    def delete_tree(self, prefix: str) -> None:
        StoredFile.objects.filter(name__startswith=prefix.rstrip("/") + "/").delete()
