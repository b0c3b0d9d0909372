"""Paths that are local files or objects in a bucket, through one layer.

A path is a local `pathlib.Path`, or, for a `gs://` or `s3://` URL, an `etils.epath.Path`: the
path type Orbax uses, whose URL backend is fsspec (gcsfs for gs://, s3fs for s3://; install them
with `pip install 'phijax[cloud]'`). Both have the pathlib methods (`/`, `name`, `exists`,
`read_text`, `iterdir`...); the functions here add what a bucket needs done differently.

A bucket has no rename and no append: `write_bytes` / `write_text` replace a whole object in one
request (locally: a temporary file renamed over the target), and `create_if_absent` is the one
way to claim a name. Credentials come from the environment, as each client reads them:
Application Default Credentials for GCS, the AWS variables, profile or instance role for S3;
`AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) points S3 clients at another endpoint, and
`STORAGE_EMULATOR_HOST` / `TENSORSTORE_GCS_HTTP_URL` GCS ones. Nothing here writes them anywhere.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Union

from etils import epath

from phijax.errors import ConfigError
from phijax.files import atomic_write

SCHEMES = ("gs", "s3")
CLIENTS = {"gs": "gcsfs", "s3": "s3fs"}
AnyPath = Union[Path, epath.Path]


def is_url(path) -> bool:
    """True for a `gs://` or `s3://` URL (a str or a path object)."""
    return str(path).split("://", 1)[0] in SCHEMES and "://" in str(path)


def as_path(path: str | os.PathLike) -> AnyPath:
    """A local `Path`, or an `epath.Path` for a gs:// or s3:// URL; ConfigError for another
    scheme (`az://`, `http://`...), which would otherwise become a local folder."""
    text = str(path)
    if is_url(text):
        if not bucket_and_key(text)[1]:
            raise ConfigError(f"{text}: no bucket named (gs://BUCKET/PATH, s3://BUCKET/PATH)")
        return epath.Path(text.rstrip("/"))
    scheme = text.split("://", 1)[0]
    if "://" in text and scheme.isidentifier():
        raise ConfigError(f"{text}: {scheme}:// is not supported (local paths, gs:// and s3://)")
    return path if isinstance(path, Path) else Path(text)


def absolute(path: str | os.PathLike) -> AnyPath:
    """`as_path(path)`, made absolute when it is local (a URL already is)."""
    path = as_path(path)
    return path if is_url(path) else path.absolute()


def bucket_and_key(url: str | os.PathLike) -> tuple[str, str, str]:
    """(scheme, bucket, key) of a URL: `gs://b/runs/x` -> ("gs", "b", "runs/x")."""
    scheme, rest = str(url).split("://", 1)
    bucket, _, key = rest.partition("/")
    return scheme, bucket, key.strip("/")


def filesystem(url: str | os.PathLike):
    """(fsspec filesystem, its path) for a URL; ConfigError when its client is not installed."""
    import fsspec
    scheme = str(url).split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(str(url))
    except ImportError:
        raise ConfigError(f"{url}: {scheme}:// paths need {CLIENTS[scheme]} "
                          f"(pip install 'phijax[cloud]')") from None


def exists(path: str | os.PathLike) -> bool:
    """Whether a file, directory or object (or any object under a prefix) is at `path`."""
    if not is_url(path):
        return as_path(path).exists()
    fs, key = filesystem(path)
    fs.invalidate_cache(key)  # other hosts (and TensorStore) write behind fsspec's back
    return fs.exists(key)


def listdir(path: str | os.PathLike) -> list[str]:
    """The sorted names directly under `path` (files and sub-directories or prefixes); [] when
    there is nothing there."""
    if not is_url(path):
        local = as_path(path)
        return sorted(os.listdir(local)) if local.is_dir() else []
    fs, key = filesystem(path)
    fs.invalidate_cache(key)
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(key, detail=False)
                      if p.rstrip("/") != key)
    except FileNotFoundError:
        return []


def read_bytes(path: str | os.PathLike) -> bytes:
    """The content of a file or object, as it is now (not as a cached listing saw it)."""
    if is_url(path):
        fs, key = filesystem(path)
        fs.invalidate_cache(key)
        return fs.cat_file(key)
    return as_path(path).read_bytes()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def open_read(path: str | os.PathLike):
    """A seekable binary file object for reading; on a bucket, reads are ranged requests of
    fsspec's block size (a seek does not download what it skips)."""
    if not is_url(path):
        return open(path, "rb")
    fs, key = filesystem(path)
    return fs.open(key, "rb")


def stamp(path: str | os.PathLike) -> tuple:
    """(size in bytes, version) of a file or object: its modification time locally, its ETag or
    generation on a bucket; a rewritten file gets a new stamp."""
    if not is_url(path):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    fs, key = filesystem(path)
    fs.invalidate_cache(key)
    info = fs.info(key)
    version = info.get("ETag") or info.get("generation") or info.get("etag") or \
        str(info.get("LastModified") or info.get("updated") or "")
    return int(info["size"]), str(version).strip('"')


def is_dir(path: str | os.PathLike) -> bool:
    """A local directory, or a prefix with objects under it."""
    if not is_url(path):
        return as_path(path).is_dir()
    fs, key = filesystem(path)
    fs.invalidate_cache(key)
    return fs.isdir(key)


def files_under(path: str | os.PathLike, glob: str | None = None) -> list[str]:
    """The files of a directory or prefix matching `glob` (default every file, recursively),
    sorted; a file is its own list. URLs come back as URLs."""
    if not is_url(path):
        local = as_path(path)
        if not local.is_dir():
            return [str(path)]
        return sorted(str(p) for p in local.glob(glob or "**/*") if p.is_file())
    fs, key = filesystem(path)
    fs.invalidate_cache(key)
    if not fs.isdir(key):
        return [str(path).rstrip("/")]
    scheme = str(path).split("://", 1)[0]
    found = fs.glob(f"{key}/{glob}") if glob else fs.find(key)
    return sorted(f"{scheme}://{k}" for k in found if not fs.isdir(k))


def write_bytes(path: str | os.PathLike, data: bytes) -> AnyPath:
    """Replace `path` whole: a reader (or a run killed at any instant) sees the old content or
    the new, never part of it. On a bucket, one object upload; locally, a temporary file beside
    it renamed over it."""
    if not is_url(path):
        return atomic_write(path, data)
    fs, key = filesystem(path)
    fs.pipe_file(key, bytes(data))
    return as_path(path)


def write_text(path: str | os.PathLike, text: str) -> AnyPath:
    return write_bytes(path, text.encode("utf-8"))


def create_if_absent(path: str | os.PathLike, data: bytes | str) -> bool:
    """Create `path` holding `data` if nothing is there yet: True if this call created it,
    False if it existed (then it is left as it was). At most one of any number of concurrent
    callers, on any host, gets True, and a reader never sees the file partly written: the
    building block of locks and claims.

    Locally the data goes to a temporary file that is hard-linked to `path` (a link fails when
    the name exists; O_CREAT|O_EXCL where the file system has no hard links). On S3 it is a
    conditional PUT (`If-None-Match: *`, refused with 412 when the key exists), on GCS an upload
    with the precondition `ifGenerationMatch=0`; both are checked by the store itself, so they
    hold across hosts. Meant for small objects (a lock, a status record)."""
    data = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if is_url(path):
        fs, key = filesystem(path)
        try:
            fs.pipe_file(key, data, mode="create")
        except FileExistsError:
            return False
        return True
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        atomic_write(tmp, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            return _create_exclusive(path, data)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _create_exclusive(path: Path, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def remove(path: str | os.PathLike, recursive: bool = False) -> None:
    """Delete a file or object (`recursive`: everything under a directory or prefix); nothing
    there is not an error."""
    if is_url(path):
        fs, key = filesystem(path)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(key, recursive=recursive)
        fs.invalidate_cache(key)
        return
    path = as_path(path)
    if recursive and path.is_dir():
        import shutil
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def move_tree(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move a directory. Locally one rename; on a bucket (no rename) each object is copied, then
    the source deleted: not atomic, so only for setting data aside."""
    if not is_url(source):
        as_path(source).rename(target)
        return
    fs, src = filesystem(source)
    _, dst = filesystem(target)
    fs.invalidate_cache(src)
    for key in fs.find(src):
        fs.copy(key, f"{dst}/{key[len(src):].lstrip('/')}")
    remove(source, recursive=True)


def upload(local: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy a local file to `target` (a path or URL), whole: on a bucket one object upload
    (multipart for a large file, visible only once complete)."""
    if not is_url(target):
        write_bytes(target, Path(local).read_bytes())
        return
    fs, key = filesystem(target)
    fs.put_file(str(local), key)


_copies: dict[tuple, Path] = {}


def local_copy(url: str | os.PathLike, beside: tuple[str, ...] = ()) -> Path:
    """A local copy, for libraries that read only local files, of the object at `url` and of
    the objects named in `beside` next to it that exist; for a prefix (a directory), of the
    `beside` names under it. Downloaded once per process into a temporary directory; returns
    the local file, or directory."""
    key = (str(url), beside)
    if key not in _copies:
        fs, remote = filesystem(url)
        fs.invalidate_cache(remote)
        folder = Path(tempfile.mkdtemp(prefix="phijax-copy-"))
        is_file = fs.isfile(remote)
        base = remote.rsplit("/", 1)[0] if is_file else remote
        names = ({remote.rsplit("/", 1)[1]} if is_file else set()) | set(beside)
        for name in names:
            if fs.isfile(f"{base}/{name}"):
                atomic_write(folder / name, fs.cat_file(f"{base}/{name}"))
        _copies[key] = folder / remote.rsplit("/", 1)[1] if is_file else folder
    return _copies[key]


def download_tree(url: str | os.PathLike) -> Path:
    """A local copy of every object under the prefix `url`, in a new temporary directory, for
    libraries that read only local directories (safetensors, transformers)."""
    fs, remote = filesystem(url)
    fs.invalidate_cache(remote)
    folder = Path(tempfile.mkdtemp(prefix="phijax-copy-"))
    for key in fs.find(remote):
        target = folder / key[len(remote):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(key, str(target))
    return folder


def upload_tree(local: str | os.PathLike, url: str | os.PathLike) -> None:
    """Every file under the local directory `local` to the same names under `url`."""
    for file in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        upload(file, f"{str(url).rstrip('/')}/{file.relative_to(local).as_posix()}")


def kvstore(path: str | os.PathLike) -> dict:
    """The TensorStore kvstore spec of `path`: the file driver for a local path, `gcs` or `s3`
    for a URL. TensorStore reads GCS credentials itself (and `TENSORSTORE_GCS_HTTP_URL` for
    another endpoint); for S3 the spec names the endpoint and region the AWS variables give
    (`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, `AWS_REGION` / `AWS_DEFAULT_REGION`: TensorStore
    does not read them) and the credentials in the environment when there are some, else its
    default chain (profile, instance role)."""
    if not is_url(path):
        return {"driver": "file", "path": str(absolute(path))}
    scheme, bucket, key = bucket_and_key(path)
    if scheme == "gs":
        return {"driver": "gcs", "bucket": bucket, "path": key}
    spec = {"driver": "s3", "bucket": bucket, "path": key}
    env = os.environ
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if endpoint:
        spec["endpoint"] = endpoint
    if region:
        spec["aws_region"] = region
    if env.get("AWS_ACCESS_KEY_ID"):
        spec["aws_credentials"] = {"type": "environment"}
    return spec


def check_writable(url: str | os.PathLike, what: str) -> None:
    """ConfigError naming `what` and the URL when the bucket cannot be written (it does not
    exist, the credentials may not write it, it cannot be reached): a probe object is written
    under it and deleted."""
    probe = f"{str(url).rstrip('/')}/.phijax-probe-{uuid.uuid4().hex}"
    quiet = logging.getLogger("gcsfs")  # it logs each failed request with a traceback
    level, _ = quiet.level, quiet.setLevel(logging.CRITICAL)
    try:
        write_bytes(probe, b"")
        remove(probe)
    except ConfigError:
        raise
    except Exception as e:  # clients raise OSError subclasses, botocore and aiohttp errors
        raise ConfigError(f"{what} {url}: cannot write there ({_reason(e)})") from None
    finally:
        quiet.setLevel(level)


def _reason(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "no such bucket"
    if isinstance(e, PermissionError):
        return "permission denied"
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
