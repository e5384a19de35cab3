"""Models by name, against a real local HTTP server that answers as the Hugging Face Hub does (model
info with file metadata, HEAD and ranged GET on /resolve/), with huggingface_hub pointed at it by
HF_ENDPOINT and the CLI run as users run it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import CLI, assert_one_line_error, run_cli

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "tests/Tiny-MoE-GGUF"
FILE = "Tiny-MoE-F32.gguf"
PADDED = "Tiny-MoE-PAD.gguf"  # the same model with a header of several hundred KB
GATED: dict = {}  # a repository whose terms were not accepted


@dataclass
class Served:
    data: bytes
    listed_sha256: str | None = None  # what the listing claims (default: the real one)
    listed_size: int | None = None
    cut_at: int = 0  # if set, the first full GET drops the connection after this many bytes


@dataclass
class Hub:
    """The repositories the server holds and every request it saw."""

    repos: dict[str, dict[str, Served]]
    requests: list[dict] = field(default_factory=list)
    url: str = ""

    def file_requests(self, name: str) -> list[dict]:
        return [r for r in self.requests if "/resolve/" in r["path"] and r["path"].endswith("/" + name)]


def _handler(hub: Hub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _error(self, status: int, code: str) -> None:
            body = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._serve(head=False)

        def do_HEAD(self):
            self._serve(head=True)

        def _serve(self, head: bool) -> None:
            path = self.path.split("?", 1)[0]
            seen = {"method": self.command, "path": path, "range": self.headers.get("Range"), "sent": 0}
            hub.requests.append(seen)
            info = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            repo = hub.repos.get((info or resolve).group(1)) if (info or resolve) else None
            if repo is GATED:
                return self._error(401, "GatedRepo")
            if repo is None:
                return self._error(404, "RepoNotFound")
            if info:
                siblings = [
                    {"rfilename": name, "size": s.listed_size or len(s.data), "blobId": hashlib.sha1(s.data).hexdigest(),
                     "lfs": {"size": s.listed_size or len(s.data), "pointerSize": 134,
                             "sha256": s.listed_sha256 or hashlib.sha256(s.data).hexdigest()}}
                    for name, s in repo.items()
                ]
                body = json.dumps({"id": info.group(1), "sha": COMMIT, "siblings": siblings}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                return self.wfile.write(body)
            served = repo.get(resolve.group(3))
            if served is None:
                return self._error(404, "EntryNotFound")
            data, size = served.data, len(served.data)
            etag = served.listed_sha256 or hashlib.sha256(data).hexdigest()
            start, end, status = 0, size, 200
            ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
            if ranged:
                start, end, status = int(ranged.group(1)), min(size, int(ranged.group(2) or size - 1) + 1), 206
            self.send_response(status)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Linked-ETag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(served.listed_size or size))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()
            if head:
                return
            body = data[start:end]
            if served.cut_at and not ranged:
                body, served.cut_at = body[: served.cut_at], 0
                self.close_connection = True
            self.wfile.write(body)
            seen["sent"] = len(body)

    return Handler


def _with_big_header(data: bytes, extra: int) -> bytes:
    """`data` (a GGUF) with one more metadata key: a string array of about `extra` bytes, sized to
    a multiple of 32 so that the tensor data keeps its alignment."""
    key = b"test.padding"
    strings = [b"x" * 100] * (extra // 108)
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 8, len(strings))
    kv += b"".join(struct.pack("<Q", len(s)) + s for s in strings)
    strings[-1] += b"x" * (-len(kv) % 32)
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 8, len(strings))
    kv += b"".join(struct.pack("<Q", len(s)) + s for s in strings)
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    return data[:8] + struct.pack("<QQ", n_tensors, n_kv + 1) + kv + data[24:]


@pytest.fixture
def hub(test_model, tmp_path):
    model = Path(test_model()).read_bytes()
    free = shutil.disk_usage(tmp_path).free
    hub = Hub({
        REPO: {FILE: Served(model), PADDED: Served(_with_big_header(model, 600_000)), "mmproj-F32.gguf": Served(b"not it")},
        # big enough for huggingface_hub to have written some of it when the connection drops
        "tests/Cut-GGUF": {"Cut-Q8_0.gguf": Served(_with_big_header(model, 16_000_000), cut_at=15_000_000)},
        "tests/Bad-GGUF": {"Bad-Q8_0.gguf": Served(model[:-1] + bytes([model[-1] ^ 1]),
                                                  listed_sha256=hashlib.sha256(model).hexdigest())},
        "tests/Huge-GGUF": {"Huge-Q8_0.gguf": Served(model, listed_size=2 * free + (1 << 40))},
        "tests/Split-GGUF": {"Split-Q8_0-00001-of-00002.gguf": Served(model)},
        "tests/Gated-GGUF": GATED,
    })
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield hub
    server.shutdown()
    server.server_close()


@pytest.fixture
def env(hub, tmp_path):
    catalog = tmp_path / "models.toml"
    catalog.write_text(f'[[model]]\nname = "Tiny-MoE"\nhf_repo = "{REPO}"\ndefault_quant = "F32"\n'
                       f'hf_files = {{ PAD = "{PADDED}" }}\n')
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
            "ROTARY_GGUF_MODELS": str(catalog), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": "", "HF_HUB_OFFLINE": "0"}


def pull(env, name):
    return run_cli("pull", name, env=env)


def assert_fails_with(result, *fragments: str) -> None:
    """Exit 2, no traceback, and one error line, the last one (after any progress lines)."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.stderr
    assert all(f in lines[-1] for f in fragments), lines[-1]


def test_pull_downloads_checks_and_prints_the_path_then_is_instant(hub, env, tmp_path):
    first = pull(env, "Tiny-MoE")
    assert first.returncode == 0, first.stderr
    path = Path(first.stdout.strip().splitlines()[-1])
    assert path.is_relative_to(tmp_path / "hf" / "hub" / "models--tests--Tiny-MoE-GGUF" / "snapshots" / COMMIT)
    assert path.name == FILE and path.read_bytes() == hub.repos[REPO][FILE].data
    assert [r["method"] for r in hub.file_requests(FILE)] == ["HEAD", "GET"]

    seen = len(hub.requests)
    again = pull(env, "tiny-moe:F32")  # names are case-insensitive; the quant is the default one
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == str(path)
    assert "already downloaded" in again.stderr
    assert len(hub.requests) == seen  # no request at all: the cache answers


def test_a_dropped_connection_resumes(hub, env):
    result = pull(env, "tests/Cut-GGUF:Q8_0")
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.read_bytes() == hub.repos["tests/Cut-GGUF"]["Cut-Q8_0.gguf"].data
    first, second = [r for r in hub.file_requests("Cut-Q8_0.gguf") if r["method"] == "GET"]
    assert first["range"] is None and first["sent"] == 15_000_000
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", second["range"]).group(1))  # the second GET asks for the rest only
    assert 0 < resumed_at <= 15_000_000 and second["sent"] == path.stat().st_size - resumed_at


def test_a_corrupted_download_is_refused_and_not_kept(hub, env, tmp_path):
    result = pull(env, "tests/Bad-GGUF:Q8_0")
    assert_fails_with(result, "hashes to", "removed it")
    storage = tmp_path / "hf" / "hub" / "models--tests--Bad-GGUF"
    assert not list(storage.rglob("*.gguf")) and not [p for p in (storage / "blobs").iterdir()]
    assert_one_line_error(run_cli("chat", "tests/Bad-GGUF:Q8_0", env=env), "not downloaded yet",
                          "rotary-gguf pull tests/Bad-GGUF:Q8_0")


@pytest.mark.parametrize("name, fragments", [
    ("Tiny-MoF", ["did you mean Tiny-MoE?", "known names:", "Qwen3.6-35B-A3B"]),
    ("tests/No-Such-GGUF:Q4_K_M", ["no such repository"]),
    (f"hf:{REPO}/missing.gguf", ["has no file missing.gguf"]),
    (f"{REPO}:Q2_K", ["has no Q2_K GGUF", FILE]),
    ("tests/Split-GGUF:Q8_0", ["split files"]),
    ("tests/Huge-GGUF:Q8_0", ["Huge-Q8_0.gguf is", "free", "HF_HUB_CACHE"]),
    ("tests/Gated-GGUF:Q8_0", ["gated", "HF_TOKEN"]),
    ("offline", ["not downloaded", "HF_HUB_OFFLINE"]),
])
def test_refusals_are_one_line(hub, env, name, fragments):
    if name == "offline":
        name, env = "Tiny-MoE", {**env, "HF_HUB_OFFLINE": "1"}
    assert_one_line_error(pull(env, name), *fragments)
    assert not [r for r in hub.requests if r["method"] == "GET" and "/resolve/" in r["path"]]  # nothing downloaded


def test_an_unreachable_hub_is_one_line(env, tmp_path):
    assert_one_line_error(pull({**env, "HF_ENDPOINT": "http://127.0.0.1:9"}, "Tiny-MoE"), "cannot reach the Hub")


@pytest.mark.parametrize("command", [["inspect", "--json"], ["plan", "--vram", "2GiB", "--json"]])
def test_plan_and_inspect_read_the_header_alone(hub, env, command):
    name = "Tiny-MoE:PAD"  # its header takes several ranged reads
    size = len(hub.repos[REPO][PADDED].data)
    result = run_cli(command[0], name, *command[1:], env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    if command[0] == "inspect":
        assert summary["file_bytes"] == size and summary["file"] == f"{REPO}/{PADDED}"
    else:
        assert summary["model"] == PADDED and summary["vram_budget"] + summary["reserve"]["bytes"] == 2 << 30
    gets = [r for r in hub.file_requests(PADDED) if r["method"] == "GET"]
    assert len(gets) >= 2 and all(g["range"] for g in gets)
    assert sum(g["sent"] for g in gets) < size / 3

    seen = len(hub.requests)  # the second time, the cached header answers
    again = run_cli(command[0], name, *command[1:], env=env)
    assert again.returncode == 0 and json.loads(again.stdout) == summary and len(hub.requests) == seen


def test_names_run_the_pulled_file(hub, env):
    assert_one_line_error(run_cli("serve", "Tiny-MoE", env=env), "not downloaded yet", "rotary-gguf pull Tiny-MoE")
    path = pull(env, "Tiny-MoE").stdout.strip().splitlines()[-1]
    seen = len(hub.requests)
    chat = subprocess.run([CLI, "chat", "Tiny-MoE", "--threads", "1", "--max-tokens", "2"], input="Hi\n/exit\n",
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert chat.returncode == 0, chat.stderr
    assert f"chatting with {Path(path).name}" in chat.stdout
    generated = run_cli("generate", "Tiny-MoE", "-n", "2", env=env)
    assert generated.returncode == 0, generated.stderr
    assert len(hub.requests) == seen  # resolved from the cache, offline


def test_quant_files_are_picked_by_suffix():
    from rotary_gguf.hub import _pick_quant

    names = ["mmproj-F16.gguf", "M-UD-Q4_K_M.gguf", "M-Q4_K_M.gguf", "M-Q4_K_S.gguf", "BF16/M-BF16.gguf", "README.md"]
    assert _pick_quant("Q4_K_M", names) == "M-Q4_K_M.gguf"
    assert _pick_quant("ud-q4_k_m", names) == "M-UD-Q4_K_M.gguf"
    assert _pick_quant("BF16", names) == "BF16/M-BF16.gguf"
    assert _pick_quant("F16", names) is None and _pick_quant("K_M", names) is None
