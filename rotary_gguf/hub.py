"""Models by name: a catalog entry, OWNER/REPO:QUANT or hf:OWNER/REPO/FILE.gguf on the Hugging Face
Hub. `pull` downloads one with huggingface_hub into its usual cache (HF_HOME / HF_HUB_CACHE), checks
the free disk space first and the sha256 the Hub lists after; `remote_inventory` reads only the
header of a file not yet downloaded, by ranged requests, so that `plan` and `inspect` work first."""

from __future__ import annotations

import contextlib
import difflib
import errno
import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from .catalog import load_catalog
from .errors import UserError
from .inventory import HeaderIncomplete, Inventory, read_header, read_inventory
from .units import human_bytes
from .user_cache import cache_dir

DEFAULT_QUANT = "Q4_K_M"  # what OWNER/REPO means without :QUANT, and a catalog entry without default_quant
DEFAULT_REVISION = "main"
HF_PREFIX = "hf:"
FIRST_HEADER_READ = 1 << 18  # the first ranged read; each further one doubles what is held
MAX_HEADER_BYTES = 1 << 28  # a GGUF header (metadata + tensor index) larger than this is refused
_SPLIT_PART = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
_QUANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_HASH_CHUNK = 1 << 24
NAME_FORMS = "NAME[:QUANT] (a catalog name), OWNER/REPO[:QUANT] or hf:OWNER/REPO/FILE.gguf"


@dataclass(frozen=True)
class HubModel:
    """A GGUF on the Hub as the user named it: a repository and either its file or a quant to find."""

    name: str  # as typed, for messages and the `pull` hint
    repo: str
    filename: str | None = None
    quant: str | None = None
    revision: str = DEFAULT_REVISION


@dataclass(frozen=True)
class HubFile:
    """One file of a repository at one commit, with the size and checksum the Hub lists for it."""

    repo: str
    filename: str
    commit: str
    size: int
    sha256: str | None  # every LFS file (any GGUF of more than a few MB)
    git_sha1: str | None  # the git blob id, for a small file kept in git itself

    @property
    def source(self) -> str:
        return f"{self.repo}/{self.filename}"


def _write_cached(target: Path, content: bytes) -> None:
    """Write a file of our own cache whole (a temporary file renamed into place)."""
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(content)
        tmp.replace(target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {target} ({e.strerror or e}): set XDG_CACHE_HOME to a writable folder") from None


def parse_name(text: str) -> HubModel:
    """NAME[:QUANT] from the catalog, OWNER/REPO[:QUANT] or hf:OWNER/REPO/PATH.gguf; a UserError that
    lists the known names for anything else."""
    if text.startswith(HF_PREFIX):
        owner, _, rest = text[len(HF_PREFIX):].partition("/")
        repo_name, _, filename = rest.partition("/")
        if not (owner and repo_name and filename.lower().endswith(".gguf")):
            raise UserError(f"{text!r}: a file on the Hub is written hf:OWNER/REPO/FILE.gguf")
        return HubModel(text, f"{owner}/{repo_name}", filename=filename)
    name, colon, quant = text.partition(":")
    if colon and not _QUANT.fullmatch(quant):
        raise UserError(f"{text!r}: {quant!r} is not a quant name (e.g. Q4_K_M, UD-Q4_K_XL, Q8_0)")
    if "/" in name:
        owner, _, repo_name = name.partition("/")
        if not owner or not repo_name or "/" in repo_name:
            raise UserError(f"{text!r} is not a file here, nor a model name: use {NAME_FORMS}")
        return HubModel(text, name, quant=quant or DEFAULT_QUANT)
    catalog = load_catalog()
    entry = next((m for m in catalog if m["name"].lower() == name.lower()), None)
    if entry is None:
        names = [m["name"] for m in catalog]
        close = difflib.get_close_matches(name.lower(), [n.lower() for n in names], n=1, cutoff=0.6)
        guess = next((f"did you mean {n}? " for n in names if close and n.lower() == close[0]), "")
        raise UserError(f"{text!r} is not a file here, nor a known model: {guess}known names: {', '.join(names)} "
                        "(or OWNER/REPO[:QUANT], hf:OWNER/REPO/FILE.gguf)")
    if not entry.get("hf_repo"):
        raise UserError(f"the catalog names no Hugging Face repository for {entry['name']}: "
                        "use OWNER/REPO:QUANT or hf:OWNER/REPO/FILE.gguf")
    quant = quant or entry.get("default_quant", DEFAULT_QUANT)
    files = {q.lower(): f for q, f in entry.get("hf_files", {}).items()}
    return HubModel(text, entry["hf_repo"], filename=files.get(quant.lower()), quant=quant)


def _pick_quant(quant: str, names: list[str]) -> str | None:
    """The repository file for `quant`: a .gguf whose name ends in -QUANT (or .QUANT), the
    shortest if several (Q4_K_M before UD-Q4_K_M); vision projectors (mmproj-*) never count."""
    tail = f"{quant}.gguf".lower()
    hits = [
        n for n in names
        if (base := n.rsplit("/", 1)[-1].lower()).endswith(tail) and not base.startswith("mmproj")
        and (base == tail or base[-len(tail) - 1] in "-.")
    ]
    return min(hits, key=lambda n: (len(n.rsplit("/", 1)[-1]), n)) if hits else None


def remote_file(model: HubModel) -> HubFile:
    """The file `model` names, with its commit, size and checksum from the Hub's file listing."""
    from huggingface_hub import HfApi

    with hub_errors(model.name):
        info = HfApi().model_info(model.repo, revision=model.revision, files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings or []}
    filename = model.filename or _pick_quant(model.quant, list(siblings))
    if filename is None:
        split = [n for n in siblings if _SPLIT_PART.search(n) and model.quant.lower() in n.lower()]
        if split:
            raise UserError(f"{model.repo} has {model.quant} only as split files ({split[0]}, ...): "
                            "rotary-gguf takes single-file GGUFs; merge them with llama-gguf-split --merge")
        quants = sorted(n for n in siblings if n.lower().endswith(".gguf"))
        raise UserError(f"{model.repo} has no {model.quant} GGUF; its GGUF files: {', '.join(quants) or 'none'}")
    if _SPLIT_PART.search(filename):
        raise UserError(f"{filename} is one part of a split GGUF: rotary-gguf takes single-file GGUFs; "
                        "merge the parts with llama-gguf-split --merge")
    sibling = siblings.get(filename)
    if sibling is None:
        raise UserError(f"{model.repo} has no file {filename}")
    lfs = sibling.lfs
    size = lfs.size if lfs else sibling.size
    if size is None or info.sha is None:
        raise UserError(f"the Hub listed {model.repo} without file sizes or commit: is HF_ENDPOINT a Hub?")
    return HubFile(model.repo, filename, info.sha, size, lfs.sha256 if lfs else None, sibling.blob_id)


@contextlib.contextmanager
def hub_errors(name: str) -> Iterator[None]:
    """huggingface_hub's and the network's exceptions as one-line UserErrors about `name`."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import constants
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, HFValidationError,
                                        LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    def first_line(e: BaseException) -> str:
        return (str(e).strip().splitlines() or [type(e).__name__])[0]

    try:
        yield
    except GatedRepoError:
        raise UserError(f"{name}: the repository is gated: accept its terms on its Hub page, then log in "
                        "(`hf auth login`) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise UserError(f"{name}: no such repository on the Hub (a private one needs `hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"{name}: the repository has no such revision") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError):
        raise UserError(f"{name} is not downloaded, and the Hub is not reachable (offline, or HF_HUB_OFFLINE is set)") from None
    except EntryNotFoundError:
        raise UserError(f"{name}: the repository has no such file") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        if status in (401, 403):
            raise UserError(f"{name}: the Hub refused access (HTTP {status}): log in (`hf auth login`) or set HF_TOKEN") from None
        raise UserError(f"{name}: the Hub answered HTTP {status}: {first_line(e)}") from None
    except httpx2.TransportError as e:
        raise UserError(f"{name}: cannot reach the Hub at {constants.ENDPOINT} ({first_line(e)})") from None
    except HFValidationError as e:
        raise UserError(f"{name}: {first_line(e)}") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(f"{name}: the disk filled up during the download (nothing half-written was kept): "
                            "free some space, or set HF_HUB_CACHE to a bigger disk") from None
        raise UserError(f"{name}: the download failed: {first_line(e)}") from None


# --- the local cache ------------------------------------------------------------------------------
def _storage(repo: str) -> Path:
    """huggingface_hub's cache folder for `repo` (models--OWNER--REPO)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")


def _verified_mark(blob: Path) -> Path:
    # blobs are named by their checksum, so the mark is too
    return cache_dir() / "verified" / blob.name


def cached_file(model: HubModel) -> Path | None:
    """The downloaded, checksum-verified file `model` names, found without the network; else None."""
    storage = _storage(model.repo)
    ref = storage / "refs" / model.revision
    commit = ref.read_text().strip() if ref.is_file() else model.revision
    snapshot = storage / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    names = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*.gguf")]
    if model.filename:
        filename = model.filename if model.filename in names else None
    else:
        filename = _pick_quant(model.quant, names)
    if filename is None:
        return None
    path = snapshot / filename
    return path if path.is_file() and _verified_mark(path.resolve()).exists() else None


def _check_free_space(remote: HubFile, storage: Path) -> None:
    where = storage
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < remote.size:
        raise UserError(f"{remote.filename} is {human_bytes(remote.size)} but {where} has only {human_bytes(free)} free: "
                        "free some space, or set HF_HUB_CACHE (or HF_HOME) to a bigger disk")


def _checksum(remote: HubFile, path: Path) -> tuple[str, str]:
    """(what the Hub lists, what the file hashes to): sha256 for LFS files, the git blob id otherwise."""
    if remote.sha256:
        digest, expected = hashlib.sha256(), remote.sha256
    else:
        digest, expected = hashlib.sha1(b"blob %d\0" % path.stat().st_size), remote.git_sha1 or ""
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return expected.lower(), digest.hexdigest()


def pull(model: HubModel, say: Callable[[str], None] = lambda _: None) -> Path:
    """Download `model` into the Hugging Face cache (nothing to do if it is there and verified),
    check its checksum and header, and return its path. The free disk space is checked first."""
    from huggingface_hub import hf_hub_download

    path = cached_file(model)
    if path is not None:
        say(f"{model.name} is already downloaded")
        return path
    remote = remote_file(model)
    storage = _storage(remote.repo)
    if not (storage / "blobs" / (remote.sha256 or remote.git_sha1 or "-")).exists():
        _check_free_space(remote, storage)
    say(f"downloading {remote.source} ({human_bytes(remote.size)}) into {storage}")
    with hub_errors(model.name):
        path = Path(hf_hub_download(remote.repo, remote.filename, revision=model.revision))
    blob = path.resolve()
    say("checking its sha256 against the Hub's")
    expected, actual = _checksum(remote, blob)
    if expected != actual:
        path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise UserError(f"{remote.source}: the download hashes to {actual[:16]}..., not the {expected[:16]}... the Hub "
                        "lists: removed it; pull again (if it persists, the mirror or proxy alters files)")
    read_inventory(path)
    _write_cached(_verified_mark(blob), f"{remote.source}@{remote.commit}\n".encode())
    return path


# --- the header alone -----------------------------------------------------------------------------
def _fetch_range(remote: HubFile, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file on the Hub, by one ranged GET (never the whole file)."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(remote.repo, remote.filename, revision=remote.commit)
    headers = {**build_hf_headers(), "Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
    with hub_errors(remote.source):
        with get_session().stream("GET", url, headers=headers, follow_redirects=True,
                                  timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
            if response.status_code != 206:
                response.read()
                hf_raise_for_status(response)
                raise UserError(f"{remote.source}: the server did not answer a byte-range request (HTTP "
                                f"{response.status_code}), so its header cannot be read alone: pull it first")
            data = response.read()
    if len(data) != end - start:
        raise UserError(f"{remote.source}: asked for {end - start} bytes of its header, got {len(data)}")
    return data


def remote_inventory(model: HubModel) -> Inventory:
    """The inventory of a GGUF on the Hub from its header alone: ranged reads from the start, twice
    as much each time until the header parses. Header and listing are cached, so a second call
    makes no request."""
    named = json.dumps([model.repo, model.filename, model.quant, model.revision])
    key = hashlib.sha256(named.encode()).hexdigest()[:24]
    folder = cache_dir() / "headers"
    listing, header = folder / f"{key}.json", folder / f"{key}.gguf-header"
    try:
        remote, data = HubFile(**json.loads(listing.read_text())), header.read_bytes()
    except (OSError, ValueError, TypeError):  # not cached yet (or a damaged cache entry): ask the Hub
        remote, data = remote_file(model), b""
    fetched = len(data)
    while True:
        if data:
            try:
                inv = read_header(data, remote.size, remote.source)
                break
            except HeaderIncomplete:
                pass
        if len(data) >= min(remote.size, MAX_HEADER_BYTES):
            raise UserError(f"{remote.source}: its GGUF header is larger than {human_bytes(MAX_HEADER_BYTES)}")
        end = min(remote.size, MAX_HEADER_BYTES, max(FIRST_HEADER_READ, 2 * len(data)))
        data += _fetch_range(remote, len(data), end)
    if len(data) != fetched:
        _write_cached(header, data)
        _write_cached(listing, json.dumps(asdict(remote)).encode())
    return inv
