"""llama.cpp's own command-line tools, built once from the source that the installed llama-cpp-python vendors.

    python benchmarks/llama_tools.py            # build (first time: several minutes on 2 cores) and print the paths

The benchmarks compare our artifacts with what llama.cpp's own pipeline makes (llama-imatrix + llama-quantize) and score
both with llama-perplexity, so all three must be the llama.cpp that llama-cpp-python runs: the same version's sdist
(from PyPI, checked against the sha256 the index publishes), its vendor/llama.cpp built with portable CPU flags into
$XDG_CACHE_HOME/minicpm-edge/llama.cpp-<version> (default ~/.cache). Nothing is built twice.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from importlib.metadata import version
from pathlib import Path

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
INDEX = "https://pypi.org/simple/llama-cpp-python/"


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "minicpm-edge" / f"llama.cpp-{version('llama-cpp-python')}"


def _sdist(dest: Path) -> Path:
    """The llama-cpp-python sdist of the installed version, downloaded once and checked against the index's sha256."""
    ver = version("llama-cpp-python")
    name = f"llama_cpp_python-{ver}.tar.gz"
    path = dest / name
    page = urllib.request.urlopen(INDEX, timeout=60).read().decode()
    m = re.search(r'href="([^"]*/' + re.escape(name) + r')#sha256=([0-9a-f]{64})"', page)
    if not m:
        raise SystemExit(f"{INDEX} lists no {name}")
    url, sha = m.groups()
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != sha:
        print(f"downloading {url}", file=sys.stderr)
        tmp = path.with_suffix(".part")
        with urllib.request.urlopen(url, timeout=300) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
        if hashlib.sha256(tmp.read_bytes()).hexdigest() != sha:
            raise SystemExit(f"{url}: sha256 differs from the index's {sha}")
        tmp.rename(path)
    return path


def build(jobs: int | None = None) -> dict[str, Path]:
    """Paths of TOOLS, built if missing. The build log is kept beside them."""
    root = cache_dir()
    bins = {t: root / "bin" / t for t in TOOLS}
    if all(p.is_file() for p in bins.values()):
        return bins
    root.mkdir(parents=True, exist_ok=True)
    src = root / "src"
    if not (src / "CMakeLists.txt").is_file():
        tar = _sdist(root)
        with tarfile.open(tar) as t:
            top = t.getnames()[0].split("/")[0]
            members = [m for m in t.getmembers() if m.name.startswith(f"{top}/vendor/llama.cpp/")]
            t.extractall(root / "unpack", members=members, filter="data")
        shutil.rmtree(src, ignore_errors=True)
        (root / "unpack" / top / "vendor" / "llama.cpp").rename(src)
        shutil.rmtree(root / "unpack")
    log = root / "build.log"
    jobs = jobs or os.cpu_count() or 2
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"]
    print(f"building {', '.join(TOOLS)} from llama-cpp-python {version('llama-cpp-python')}'s llama.cpp "
          f"(log: {log})", file=sys.stderr)
    with open(log, "w") as f:
        for cmd in (["cmake", "-S", str(src), "-B", str(root / "build"), *flags],
                    ["cmake", "--build", str(root / "build"), "-j", str(jobs), "--target", *TOOLS]):
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"{' '.join(cmd[:3])} failed; see {log}")
    (root / "bin").mkdir(exist_ok=True)
    for t, p in bins.items():
        shutil.copy2(root / "build" / "bin" / t, p)
    return bins


if __name__ == "__main__":
    for name, path in build().items():
        print(f"{name}: {path}")
