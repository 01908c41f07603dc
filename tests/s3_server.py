"""A local S3 server (moto) for the storage tests: no cloud account and no network beyond 127.0.0.1.

Test modules build their own fixture on :class:`LocalS3` (pytest shares fixtures only through conftest.py).
URIs carry the server as pyarrow and Ray read it: ``?endpoint_override=http%3A%2F%2F127.0.0.1%3APORT&scheme=http``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import quote

import pyarrow.fs as pafs

KEY = "testing"  # moto accepts any key pair


class LocalS3:
    """A moto S3 server in a thread of this process, with helpers to make buckets and upload folders."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.fs = pafs.S3FileSystem(
            access_key=KEY,
            secret_key=KEY,
            region="us-east-1",
            endpoint_override=self.endpoint,
            scheme="http",
            allow_bucket_creation=True,
            allow_bucket_deletion=True,
        )

    def stop(self) -> None:
        self._server.stop()

    def uri(self, path: str, *, credentials: bool = False) -> str:
        """``s3://<path>?endpoint_override=…&scheme=http``; with ``credentials``, the key pair in the URI.

        Ray's worker processes inherit the environment of the ``ray.init`` that started them, which a test
        cannot change afterwards; credentials in the URI reach them anyway.
        """
        user = f"{KEY}:{KEY}@" if credentials else ""
        return f"s3://{user}{path}?endpoint_override={quote(self.endpoint, safe='')}&scheme=http"

    def make_bucket(self, bucket: str) -> None:
        self.fs.create_dir(bucket)

    def upload(self, folder: Path, prefix: str) -> None:
        """Copy a local folder to ``s3://<prefix>/`` (recursively)."""
        pafs.copy_files(str(folder.resolve()), prefix, destination_filesystem=self.fs)

    def files(self, prefix: str) -> list[str]:
        """Every object under ``prefix``, as paths relative to it."""
        infos = self.fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
        return sorted(info.path[len(prefix) + 1 :] for info in infos if info.type == pafs.FileType.File)
