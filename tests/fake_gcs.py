"""A fake Google Cloud Storage for tests: one in-memory object store seen
both through fsspec (``gs://`` paths of etils.epath, Orbax's folder work)
and through the GCS JSON API over HTTP (TensorStore's ``gcs`` driver, which
writes Orbax's arrays; pointed here by ``TENSORSTORE_GCS_HTTP_URL``).

Only what those two clients use is implemented: objects with generations,
media upload (with ``ifGenerationMatch``), ranged media download, metadata,
prefix listing and delete. Folders are prefixes, as in a bucket.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
import urllib.parse

import fsspec
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem


class Store:
  """``{'bucket/name': (bytes, generation)}`` behind a lock."""

  def __init__(self):
    self.objects: dict[str, tuple[bytes, int]] = {}
    self.lock = threading.Lock()
    self._generation = 0

  def put(self, key: str, data: bytes, if_generation: int | None = None
          ) -> int | None:
    with self.lock:
      current = self.objects.get(key, (None, 0))[1]
      if if_generation is not None and current != if_generation:
        return None
      self._generation += 1
      self.objects[key] = (bytes(data), self._generation)
      return self._generation

  def get(self, key: str):
    with self.lock:
      return self.objects.get(key)

  def delete(self, key: str) -> bool:
    with self.lock:
      return self.objects.pop(key, None) is not None

  def keys(self, prefix: str) -> list[str]:
    with self.lock:
      return sorted(k for k in self.objects if k.startswith(prefix))


STORE = Store()


# ---------------------------------------------------------------------------
# fsspec: gs://bucket/name
# ---------------------------------------------------------------------------
class _File(AbstractBufferedFile):
  def _fetch_range(self, start, end):
    return STORE.get(self.path)[0][start:end]

  def _upload_chunk(self, final=False):
    if final:
      self.fs._pending[self.path] = self.fs._pending.get(self.path, b"") + (
          self.buffer.getvalue())
      STORE.put(self.path, self.fs._pending.pop(self.path))
    else:
      self.fs._pending[self.path] = self.fs._pending.get(self.path, b"") + (
          self.buffer.getvalue())
    return True

  def _initiate_upload(self):
    self.fs._pending[self.path] = b""


class FakeGCSFileSystem(AbstractFileSystem):
  """The store as a bucket file system (objects; folders are prefixes)."""

  protocol = ("gs", "gcs")
  root_marker = ""
  cachable = False

  def __init__(self, *args, **kwargs):
    kwargs.pop("finalize_on_close", None)
    super().__init__(*args, **kwargs)
    self._pending: dict[str, bytes] = {}

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for p in ("gs://", "gcs://"):
      if path.startswith(p):
        path = path[len(p):]
    return path.rstrip("/")

  def ls(self, path, detail=True, **kwargs):
    path = self._strip_protocol(path)
    prefix = path + "/" if path else ""
    entries = {}
    for key in STORE.keys(prefix):
      rest = key[len(prefix):]
      head = rest.split("/", 1)[0]
      name = prefix + head
      if "/" in rest:
        entries[name] = {"name": name, "size": 0, "type": "directory"}
      elif rest:
        entries[name] = {"name": name, "size": len(STORE.get(key)[0]),
                         "type": "file"}
    if not entries and STORE.get(path) is not None:
      entries[path] = {"name": path, "size": len(STORE.get(path)[0]),
                       "type": "file"}
    if not entries and not STORE.keys(prefix) and STORE.get(path) is None:
      if "/" in path:  # an empty bucket is a folder; anything else missing
        raise FileNotFoundError(path)
    out = sorted(entries.values(), key=lambda e: e["name"])
    return out if detail else [e["name"] for e in out]

  def info(self, path, **kwargs):
    path = self._strip_protocol(path)
    obj = STORE.get(path)
    if obj is not None:
      return {"name": path, "size": len(obj[0]), "type": "file"}
    if STORE.keys(path + "/") or "/" not in path:
      return {"name": path, "size": 0, "type": "directory"}
    raise FileNotFoundError(path)

  def makedirs(self, path, exist_ok=False):
    pass  # folders are prefixes

  def mkdir(self, path, create_parents=True, **kwargs):
    pass

  def rmdir(self, path):
    pass

  def _rm(self, path):
    path = self._strip_protocol(path)
    if not STORE.delete(path):
      for key in STORE.keys(path + "/"):
        STORE.delete(key)

  def rm(self, path, recursive=False, maxdepth=None):
    paths = path if isinstance(path, list) else [path]
    for p in paths:
      p = self._strip_protocol(p)
      if recursive:
        for key in STORE.keys(p + "/"):
          STORE.delete(key)
      STORE.delete(p)

  def cp_file(self, path1, path2, **kwargs):
    data = STORE.get(self._strip_protocol(path1))
    if data is None:
      raise FileNotFoundError(path1)
    STORE.put(self._strip_protocol(path2), data[0])

  def mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs):
    src, dst = self._strip_protocol(path1), self._strip_protocol(path2)
    if STORE.get(src) is not None:
      self.cp_file(src, dst)
      STORE.delete(src)
      return
    for key in STORE.keys(src + "/"):
      STORE.put(dst + key[len(src):], STORE.get(key)[0])
      STORE.delete(key)

  def _open(self, path, mode="rb", block_size=None, autocommit=True,
            cache_options=None, **kwargs):
    path = self._strip_protocol(path)
    if "r" in mode and STORE.get(path) is None:
      raise FileNotFoundError(path)
    return _File(self, path, mode, block_size or 1 << 20, autocommit,
                 cache_options=cache_options, size=(
                     len(STORE.get(path)[0]) if "r" in mode else None))


def install_fsspec() -> None:
  fsspec.register_implementation("gs", FakeGCSFileSystem, clobber=True)
  fsspec.register_implementation("gcs", FakeGCSFileSystem, clobber=True)


# ---------------------------------------------------------------------------
# The GCS JSON API for TensorStore.
# ---------------------------------------------------------------------------
def _meta(bucket: str, name: str, data: bytes, generation: int) -> dict:
  return {"kind": "storage#object", "bucket": bucket, "name": name,
          "size": str(len(data)), "generation": str(generation),
          "metageneration": "1"}


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"

  def log_message(self, *args):
    pass

  def _send(self, code: int, body: bytes = b"", headers: dict | None = None,
            content_type: str = "application/json"):
    self.send_response(code)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    self.end_headers()
    if body and self.command != "HEAD":
      self.wfile.write(body)

  def _json(self, code: int, obj: dict, headers: dict | None = None):
    self._send(code, json.dumps(obj).encode(), headers)

  def _error(self, code: int, message: str):
    self._json(code, {"error": {"code": code, "message": message}})

  def _route(self):
    url = urllib.parse.urlparse(self.path)
    query = dict(urllib.parse.parse_qsl(url.query))
    m = re.match(r"^/(upload/)?storage/v1/b/([^/]+)/o(?:/(.+))?$", url.path)
    if not m:
      return self._error(404, f"no route {url.path}")
    upload, bucket, obj = m.group(1), m.group(2), m.group(3)
    obj = urllib.parse.unquote(obj) if obj else None
    length = int(self.headers.get("Content-Length") or 0)
    body = self.rfile.read(length) if length else b""
    if upload and self.command == "POST":
      name = query["name"]
      match = query.get("ifGenerationMatch")
      gen = STORE.put(f"{bucket}/{name}", body,
                      None if match is None else int(match))
      if gen is None:
        return self._error(412, "precondition failed")
      return self._json(200, _meta(bucket, name, body, gen))
    if obj is None and self.command == "GET":  # list
      prefix = query.get("prefix", "")
      keys = STORE.keys(f"{bucket}/{prefix}")
      items = []
      for key in keys:
        data, gen = STORE.get(key) or (b"", 0)
        items.append(_meta(bucket, key[len(bucket) + 1:], data, gen))
      return self._json(200, {"kind": "storage#objects", "items": items})
    key = f"{bucket}/{obj}"
    found = STORE.get(key)
    if self.command == "DELETE":
      if found is None:
        return self._error(404, "not found")
      STORE.delete(key)
      return self._send(204)
    if found is None:
      return self._error(404, "not found")
    data, gen = found
    match = query.get("ifGenerationMatch")
    if match is not None and int(match) != gen:
      return self._error(412, "precondition failed")
    if query.get("alt") != "media":
      return self._json(200, _meta(bucket, obj, data, gen))
    headers = {"x-goog-generation": str(gen)}
    rng = self.headers.get("Range")
    if rng:
      start, _, end = rng.split("=", 1)[1].partition("-")
      start = int(start)
      end = min(int(end) if end else len(data) - 1, len(data) - 1)
      headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
      return self._send(206, data[start:end + 1], headers,
                        "application/octet-stream")
    return self._send(200, data, headers, "application/octet-stream")

  do_GET = do_POST = do_DELETE = do_HEAD = do_PUT = _route


def serve() -> http.server.ThreadingHTTPServer:
  """Starts the HTTP side on a free port (a daemon thread)."""
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  server.daemon_threads = True
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server
