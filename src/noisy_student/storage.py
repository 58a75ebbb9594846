"""A run directory that may live on an object store (``s3://bucket/runs/<hash>``), so a
step can run on any machine. The steps keep working on local paths: ``staged`` copies the
files a step reads into a local work directory and, when the step succeeds, publishes the
files it wrote. An object store's PUT is all-or-nothing, and the JSON records that later
steps read (``metrics.json``, a shard's statistics) are published after the files they
describe, so a reader never trusts a partial result; a failed step publishes nothing.
Credentials and endpoints come from the environment, as for any S3 client
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, profiles, roles)."""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote

import fsspec

from noisy_student.runs import RunLayout
from noisy_student.shards import SHARDS

log = logging.getLogger(__name__)


class StorageError(ValueError):
    """An object store that cannot be used: no credentials, no bucket, no access."""


REMOTE_SCHEMES = ("s3",)  # the object stores the project installs a client for (s3fs)
ACCEPTED = (
    "a local path (./NAME for a folder whose name holds a colon), file:///absolute/path "
    "or s3://bucket/prefix"
)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def run_location(text: str | Path, what: str = "runs_root") -> str:
    """``text`` as the one form every step reads: a local path as given (``file:///p`` as
    ``/p``) or ``s3://bucket/prefix`` without a trailing slash. Anything else that starts
    like a URL (``s3:/x``, ``s3:x``, ``foo://x``, ``http://h``) is refused in one line:
    taken as a local path, it would write into a folder named ``s3:``."""
    text = str(text)
    if not text.strip():
        raise StorageError(f"{what}: empty; accepted: {ACCEPTED}")
    scheme = _SCHEME.match(text)
    if scheme is None:
        return text
    name, rest = scheme.group()[:-1].lower(), text[scheme.end() :]
    if name == "file":
        for host in ("//", "//localhost"):
            if rest.startswith(f"{host}/"):
                return unquote(rest[len(host) :])
        raise StorageError(
            f"{what} {text!r}: a file URL names an absolute path on this machine; "
            f"accepted: {ACCEPTED}"
        )
    if name not in REMOTE_SCHEMES:
        raise StorageError(f"{what} {text!r}: unknown scheme {name!r}; accepted: {ACCEPTED}")
    bucket, _, prefix = rest.removeprefix("//").partition("/")
    parts = prefix.rstrip("/").split("/") if prefix.rstrip("/") else []
    if not rest.startswith("//") or not _BUCKET.fullmatch(bucket):
        raise StorageError(
            f"{what} {text!r}: expected {name}://BUCKET/PREFIX with a bucket name of 3-63 "
            f"lower-case letters, digits, dots and hyphens; accepted: {ACCEPTED}"
        )
    if any(part in ("", ".", "..") for part in parts):
        raise StorageError(
            f"{what} {text!r}: an empty, '.' or '..' part in the prefix; accepted: {ACCEPTED}"
        )
    return "/".join([f"{name}://{bucket}", *parts])


def is_remote(url: str | Path) -> bool:
    """On an object store (``url`` as :func:`run_location` returns it)."""
    return str(url).startswith(tuple(f"{scheme}://" for scheme in REMOTE_SCHEMES))


def join(root: str, *parts: str) -> str:
    """A path under ``root``, a local directory or a URL (``Path`` would fold ``s3://``)."""
    if not is_remote(root):
        return str(Path(root, *parts))
    return "/".join([root.rstrip("/"), *parts])


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()  # another machine may have written since this process listed
    return fs, path.rstrip("/")


def check_root(url: str | Path, what: str = "runs_root") -> str:
    """``url`` as :func:`run_location` returns it; fail in one line, before any work, when
    it is malformed or on a store this process cannot reach: missing credentials, a
    missing bucket, access denied."""
    url = run_location(url, what)
    if not is_remote(url):
        return url
    try:
        fs, path = _fs(url)
        bucket = path.split("/", 1)[0]
        fs.ls(bucket)  # raises, where exists() would answer False for any failure
    except StorageError:
        raise
    except ImportError as err:
        raise StorageError(f"{what} {url}: {err.msg} (pip install s3fs)") from None
    except FileNotFoundError:
        raise StorageError(f"{what} {url}: bucket {bucket!r} does not exist") from None
    except PermissionError as err:
        raise StorageError(f"{what} {url}: access denied ({_first_line(err)})") from None
    except Exception as err:  # botocore raises its own types; each says what is wrong
        name = type(err).__name__
        if "Credentials" in name:
            raise StorageError(
                f"{what} {url}: no credentials for the object store (set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)"
            ) from None
        raise StorageError(f"{what} {url}: {name}: {_first_line(err)}") from None
    return url


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def exists(url: str) -> bool:
    if not is_remote(url):
        return Path(url).exists()
    fs, path = _fs(url)
    return fs.exists(path)


def _snapshot(local: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(local).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in local.rglob("*")
        if p.is_file()
    }


def _failure(err: BaseException) -> str:
    """A store client's error in one line: botocore and s3fs raise their own types."""
    return f"{type(err).__name__}: {_first_line(err)}"


def download(url: str, local: Path, needs: Iterable[str], step: str) -> None:
    """Copy the files under each prefix of ``needs`` (relative to the run ``url``); a
    shard's parts only when the prefix names the shards' folder. A store that fails is
    one line naming the run directory, the step and the file."""
    fs, root = _fs(url)
    for prefix in needs:
        try:
            found = fs.find(f"{root}/{prefix}".rstrip("/"))
        except Exception as err:  # botocore and s3fs raise their own types
            raise StorageError(
                f"run directory {url}: {step}: listing {prefix} failed ({_failure(err)})"
            ) from None
        for remote in found:
            rel = remote[len(root) + 1 :]
            if f"/{SHARDS}/" in f"/{rel}" and f"{SHARDS}/" not in prefix:
                continue
            target = local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fs.get_file(remote, str(target))
            except Exception as err:  # botocore and s3fs raise their own types
                raise StorageError(
                    f"run directory {url}: {step}: reading {join(url, rel)} failed "
                    f"({_failure(err)})"
                ) from None


def _is_record(rel: str) -> bool:
    return rel.endswith(".json")


def publish(url: str, local: Path, before: dict[str, tuple[int, int]], step: str) -> list[str]:
    """Upload the files of ``local`` that are new or changed since ``before``: data files
    first, the JSON records that vouch for them last. An object appears whole or not at
    all (a PUT, or a multipart upload, is visible only once complete), so a failure half
    way leaves files without the record that vouches for them: the old versions of the
    records being replaced are deleted first, so no reader pairs an old record with a new
    ``model.pt``. A failure is one line naming the run directory, the step and the file."""
    fs, root = _fs(url)
    changed = [rel for rel, stat in _snapshot(local).items() if before.get(rel) != stat]
    changed.sort(key=lambda rel: (_is_record(rel), rel))
    records = [rel for rel in changed if _is_record(rel)]
    action, rel = "withdrawing the old record", ""
    try:
        for rel in records:
            fs.rm_file(f"{root}/{rel}")  # deleting a missing key succeeds
        action = "publishing"
        for rel in changed:
            fs.put_file(str(local / rel), f"{root}/{rel}")
    except Exception as err:  # botocore and s3fs raise their own types
        raise StorageError(
            f"run directory {url}: {step}: {action} {join(url, rel)} failed ({_failure(err)}); "
            "the step's records were not all published, so no step trusts its files: run it "
            "again"
        ) from None
    return changed


@contextmanager
def staged(url: str | Path, needs: Iterable[str], step: str) -> Iterator[RunLayout]:
    """The run directory ``url`` as a local one for ``step``: itself when local; for a
    URL, a temporary copy of the files under ``needs`` (its layout's ``origin`` is the
    URL), whose new files are published to ``url`` when the step returns (and dropped
    when it raises). A file the step cannot read in the copy is named by its URL: the
    temporary copy is gone by the time anyone reads the message."""
    if not is_remote(url):
        yield RunLayout(Path(url))
        return
    url = str(url)
    with tempfile.TemporaryDirectory(prefix="noisy-student-run-") as tmp:
        local = Path(tmp)
        download(url, local, needs, step)
        before = _snapshot(local)
        try:
            yield RunLayout(local, origin=url)
        except OSError as err:
            if tmp not in str(err):
                raise
            raise StorageError(_in_origin(err, tmp, url, step)) from None
        published = publish(url, local, before, step)
        log.info("published %d files to %s", len(published), url)


def _in_origin(err: OSError, tmp: str, url: str, step: str) -> str:
    """The step's error about its temporary copy, as one line about the run directory."""
    named = re.search(re.escape(tmp) + r"/([^'\"\s]+)", str(err.filename or err))
    if isinstance(err, FileNotFoundError) and named:
        missing = named.group(1)
        return (
            f"run directory {url}: {step}: {join(url, missing)} is missing (never written, "
            "or deleted from the store: run the steps before this one)"
        )
    return f"run directory {url}: {step}: {_first_line(err).replace(tmp, url)}"


def step_needs(step: str, iteration: int | None = None) -> list[str]:
    """The parts of a run directory each step reads (a step writes under its own)."""
    if step == "prepare":
        return []
    if step in ("label", "shard"):
        return ["splits/", "models/"]
    if step == "merge":
        return ["splits/", "models/", f"pseudo/iter_{iteration}/{SHARDS}/"]
    if step == "train":
        return ["splits/", "models/", f"pseudo/iter_{iteration}/"]
    return ["splits/", "models/", "pseudo/", "report/"]  # report, show


def run_step(
    run_dir: str, step: str, iteration: int | None, fn: Callable[[RunLayout], Path]
) -> str:
    """Run ``fn`` on the run directory ``run_dir`` staged for ``step``; return the path
    of its output in ``run_dir``, for any machine to read."""
    with staged(run_dir, step_needs(step, iteration), step) as layout:
        out = fn(layout)
    return join(run_dir, *Path(out).relative_to(layout.root).parts)


def check_tracking_server(uri: str | None) -> None:
    """Fail in one line, before any work, when ``MLFLOW_TRACKING_URI`` names a server that
    does not answer (a database or file store is checked when first used)."""
    if not uri or not uri.startswith(("http://", "https://")):
        return
    import httpx

    try:
        httpx.get(f"{uri.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as err:
        raise StorageError(
            f"MLFLOW_TRACKING_URI {uri}: no MLflow server answers ({_first_line(err)})"
        ) from None
