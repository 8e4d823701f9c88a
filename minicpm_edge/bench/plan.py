"""Device kits: what to run on a phone and the files to bring back for `minicpm-edge bench ingest`.

Android: `bench_android.sh` pushes a user-built llama-bench and the GGUF over adb, runs it with `-o jsonl` and pulls
the result (plus meta.txt naming the phone) back; `bench_android.sh mlc` prepares the file for MLCChat's
statistics. iOS: a fill-in file for LLMFarm's per-reply figures, and the llama-bench routes (macOS, llama.swiftui).
"""

from __future__ import annotations

import shlex
import stat
from pathlib import Path

from ..artifact import staging
from ..errors import UserError

ANDROID_SH = r"""#!/usr/bin/env bash
# minicpm-edge Android kit. `./bench_android.sh` runs llama-bench on the connected phone and pulls the results;
# `./bench_android.sh mlc` prepares results/<serial>/mlc/mlc-stats.txt for MLCChat's statistics. See README.md.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
DEFAULT_MODEL=__MODEL__
MODEL="${MODEL:-$DEFAULT_MODEL}"
LLAMA_CPP="${LLAMA_CPP:-$HERE/llama.cpp}"   # `cmake --install` prefix of an Android build: bin/llama-bench, lib/
THREADS="${THREADS:-4}"
REPS="${REPS:-5}"
N_PROMPT="${N_PROMPT:-512}"
N_GEN="${N_GEN:-128}"
REMOTE=/data/local/tmp/minicpm-edge
DEFAULT_MLC_MODEL=__MLC_MODEL__

die() { echo "error: $*" >&2; exit 1; }
adb_() { adb ${ANDROID_SERIAL:+-s "$ANDROID_SERIAL"} "$@"; }
prop() { adb_ shell getprop "$1" | tr -d '\r'; }

phone() {  # the `device:`, `soc:` and `date:` lines that `bench ingest` reads
  local soc
  soc="$(prop ro.soc.model)"
  [ -n "$soc" ] || soc="$(prop ro.board.platform)"
  echo "device: $(prop ro.product.manufacturer) $(prop ro.product.model)"
  echo "soc: $soc"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
}

command -v adb >/dev/null || die "adb not found: install Android platform-tools"
[ "$(adb_ get-state 2>/dev/null || true)" = device ] ||
  die "no phone connected (adb devices; set ANDROID_SERIAL if several)"
SERIAL="$(adb_ get-serialno | tr -d '\r')"

case "${1:-llama-bench}" in
  llama-bench)
    OUT="$HERE/results/$SERIAL/llama-bench"
    [ -f "$MODEL" ] || die "no GGUF at '$MODEL' (run with MODEL=path/to/model.gguf)"
    [ -x "$LLAMA_CPP/bin/llama-bench" ] ||
      die "no $LLAMA_CPP/bin/llama-bench: build llama.cpp for Android (README step 1)"
    mkdir -p "$OUT"
    adb_ shell mkdir -p "$REMOTE/bin" "$REMOTE/lib"
    adb_ push "$LLAMA_CPP/bin/llama-bench" "$REMOTE/bin/" >/dev/null
    for lib in "$LLAMA_CPP"/lib/*.so; do
      [ -e "$lib" ] && adb_ push "$lib" "$REMOTE/lib/" >/dev/null
    done
    adb_ shell chmod 755 "$REMOTE/bin/llama-bench"
    name="$(basename "$MODEL")"
    have="$(adb_ shell stat -c %s "$REMOTE/$name" 2>/dev/null | tr -d '\r' || true)"
    [ "$have" = "$(wc -c < "$MODEL" | tr -d ' ')" ] || adb_ push "$MODEL" "$REMOTE/$name"
    sum="$(adb_ shell sha256sum "$REMOTE/$name" 2>/dev/null | tr -d '\r' | cut -d' ' -f1 || true)"
    { phone; echo "artifact: $name"; echo "sha256: $sum"; echo "threads: $THREADS"; } > "$OUT/meta.txt"
    echo "running llama-bench (pp$N_PROMPT, tg$N_GEN, $REPS repetitions, $THREADS threads); keep the screen on"
    adb_ shell "cd $REMOTE && LD_LIBRARY_PATH=$REMOTE/lib ./bin/llama-bench -m $name -p $N_PROMPT -n $N_GEN \
      -t $THREADS -r $REPS -o jsonl > llama-bench.jsonl"
    adb_ pull "$REMOTE/llama-bench.jsonl" "$OUT/llama-bench.jsonl" >/dev/null
    echo "results: $OUT/llama-bench.jsonl"
    echo "next:    minicpm-edge bench ingest $OUT/llama-bench.jsonl"
    ;;
  mlc)
    OUT="$HERE/results/$SERIAL/mlc"
    mkdir -p "$OUT"
    { phone; echo "artifact: ${MLC_MODEL:-$DEFAULT_MLC_MODEL}"
      echo "# After each reply MLCChat shows 'prefill: X tok/s, decode: Y tok/s': copy one such line per reply below."
    } > "$OUT/mlc-stats.txt"
    echo "fill in: $OUT/mlc-stats.txt, then: minicpm-edge bench ingest $OUT/mlc-stats.txt"
    ;;
  *)
    die "usage: $0 [llama-bench|mlc]"
    ;;
esac
"""

ANDROID_README = """# Android benchmark kit (minicpm-edge)

Two routes; both end with `minicpm-edge bench ingest <file>` and `minicpm-edge bench report`.

## llama-bench over adb (scripted)

1. Build llama.cpp for Android once (llama.cpp `docs/android.md`, Android NDK), installing into this kit:

       cmake -B build-android -DCMAKE_TOOLCHAIN_FILE=$ANDROID_NDK/build/cmake/android.toolchain.cmake \\
             -DANDROID_ABI=arm64-v8a -DANDROID_PLATFORM=android-28 -DGGML_OPENMP=OFF -DGGML_LLAMAFILE=OFF
       cmake --build build-android --config Release -j
       cmake --install build-android --prefix <this kit>/llama.cpp --config Release

   (docs/android.md adds `-march=armv8.7a` C/C++ flags for recent phones; leave them out for older SoCs.)
2. Connect the phone with USB debugging on, screen on, charger off, apps closed.
3. `MODEL=__MODEL__ ./bench_android.sh` (variables: `THREADS` = big cores, default 4; `REPS`, `N_PROMPT`,
   `N_GEN`; `ANDROID_SERIAL` when several phones are connected).

It pushes `bin/llama-bench`, `lib/*.so` and the GGUF to `/data/local/tmp/minicpm-edge`, runs
`llama-bench -p 512 -n 128 -o jsonl` and pulls back `results/<serial>/llama-bench/llama-bench.jsonl`, next to
`meta.txt`:

    device: samsung SM-S918B
    soc: SM8550
    date: 2024-05-01T10:00:00Z
    artifact: minicpm-2b-Q4_0.gguf
    sha256: <sha256 of the GGUF on the phone>
    threads: 4

`bench ingest` reads llama-bench's `-o json`, `-o jsonl`, `-o csv` and `-o md` output (fields `avg_ts`,
`stddev_ts`, `n_prompt`, `n_gen`, `n_threads`, `model_filename`, `model_type`, `cpu_info`, `gpu_info`, `test_time`)
and takes the phone's name, artifact and hash from a `meta.txt` beside the file.

## MLC-LLM (MLCChat app)

MLCChat shows `prefill: X tok/s, decode: Y tok/s` under the chat after each reply (it has no command-line
benchmark on the phone). Run `./bench_android.sh mlc` with the phone connected: it writes
`results/<serial>/mlc/mlc-stats.txt` with the phone's `device:`/`soc:`/`date:` lines. Send five prompts that
ask for long answers and copy each statistics line into the file, one per line:

    device: samsung SM-S918B
    soc: SM8550
    date: 2024-05-01T10:00:00Z
    artifact: MiniCPM-2B-q4f16_1-MLC
    prefill: 48.3 tok/s, decode: 6.4 tok/s
    prefill: 51.0 tok/s, decode: 6.5 tok/s

Optional lines: `n_prompt:`, `n_gen:`, `quant:`, `sha256:`. The same line from `mlc_llm chat`'s `/stats` and
the verbose block of `mlc_llm bench` (`throughput: X tok/s` under `--- prefill ---` / `--- decode ---`) are read
too. The stored figure is the median of the lines.
"""

IOS_README = """# iOS benchmark kit (minicpm-edge)

Both routes end with `minicpm-edge bench ingest <file>` and `minicpm-edge bench report`.

## LLMFarm (App Store / TestFlight)

1. Import the GGUF (`__MODEL__`) and the MiniCPM settings template from `minicpm-edge export --target ios`
   (Documents/models and Documents/model_setting_templates, via Files or Finder).
2. Close other apps, keep the phone off the charger and cool. Start a chat with the template.
3. Send five prompts that ask for long answers (e.g. "Write a 300-word story about a lighthouse").
   Under each reply LLMFarm prints `<seconds> ses, <tokens/s> t/s`.
4. Fill in `llmfarm-results.txt`: the `device:` line (e.g. `device: iPhone 15 Pro (A17 Pro)`), then one such
   figure per reply, as shown:

       format: llmfarm-v1
       device: iPhone 15 Pro (A17 Pro)
       artifact: minicpm-2b-Q4_0.gguf
       date: 2024-05-01
       12.31 ses, 17.92 t/s
       11.87 ses, 18.05 t/s

LLMFarm's t/s divides the reply's tokens by the time since the message was sent, prompt processing included, so
these rows are flagged "includes prompt time" and read a little low for decode. LLMFarm's saved chat history
JSON (its messages carry `tok_sec`) is read too when given with `--device`.

## llama-bench (macOS, or llama.cpp's iOS example app)

- On a Mac: `llama-bench -m model.gguf -p 512 -n 128 -o jsonl > llama-bench.jsonl`, with a `meta.txt` beside it
  holding a `device:` line (the Mac's chip), or pass `--device` to `bench ingest`.
- On the phone: llama.cpp's `examples/llama.swiftui` app has a Bench button that prints a markdown table
  (`| model | size | params | backend | test | t/s |`). Paste it into `llama-bench.md` under a `device:` line.
"""

LLMFARM_TEMPLATE = """# minicpm-edge: LLMFarm results. Fill in `device:` (phone and chip), then one line per reply
# with the figure LLMFarm prints under it, e.g. `12.31 ses, 17.92 t/s`. Lines starting with # are ignored.
format: llmfarm-v1
device:
artifact: __NAME__
sha256: __SHA__
date:
"""


def _fill(text: str, **values: str) -> str:
    for k, v in values.items():
        text = text.replace(f"__{k}__", v)
    return text


def write_plan(target: str, out: Path, artifact: Path | None = None, force: bool = False) -> Path:
    """Write the kit for `target` ("android" or "ios") to `out`; artifact: the GGUF (or MLC folder) to benchmark."""
    if target not in ("android", "ios"):
        raise UserError(f"no device kit for target {target!r}; choose android or ios")
    name, sha = "", ""
    if artifact is not None:
        artifact = Path(artifact).resolve()
        if not artifact.exists():
            raise UserError(f"{artifact}: no such file or directory")
        if artifact.is_dir():  # an export folder: its GGUF, or the MLC model folder inside it
            found = sorted(artifact.glob("*.gguf")) or [p.parent for p in artifact.glob("*/mlc-chat-config.json")]
            artifact = found[0] if len(found) == 1 else artifact
        name = artifact.name
        if artifact.is_file():
            from ..artifact import sha256

            sha = sha256(artifact)
    gguf = str(artifact) if artifact is not None and artifact.suffix == ".gguf" else "path/to/model.gguf"
    with staging(out, force, f"bench-kit-{target}") as tmp:
        if target == "android":
            mlc = name if artifact is not None and artifact.is_dir() else "MiniCPM-2B-q4f16_1-MLC"
            script = tmp / "bench_android.sh"
            script.write_text(_fill(ANDROID_SH, MODEL=shlex.quote(gguf), MLC_MODEL=shlex.quote(mlc)))
            script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            (tmp / "README.md").write_text(_fill(ANDROID_README, MODEL=gguf))
        else:
            (tmp / "README.md").write_text(_fill(IOS_README, MODEL=name or "model.gguf"))
            (tmp / "llmfarm-results.txt").write_text(_fill(LLMFARM_TEMPLATE, NAME=name, SHA=sha))
    return out
