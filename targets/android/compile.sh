#!/usr/bin/env bash
# Build the MLCChat Android app for an export made by `minicpm-edge export --target android|harmony`.
#
#   targets/android/compile.sh EXPORT_DIR [APP_DIST]
#
# 1. mlc_llm compile EXPORT_DIR/<model_id>/mlc-chat-config.json --device android -> BUILD/lib/<model_id>-android.tar
# 2. mlc_llm package with EXPORT_DIR/mlc-package-config.json (paths made absolute in BUILD/) -> APP_DIST
#    (default $MLC_LLM_SOURCE_DIR/android/MLCChat/dist, where the MLCChat Gradle project looks for dist/lib/mlc4j).
# BUILD is $MLC_BUILD_DIR or EXPORT_DIR-build; the export folder itself is not modified.
# Needs: mlc_llm (with its TVM), python3, the Android NDK (ANDROID_NDK, TVM_NDK_CC), JAVA_HOME, rustup, cmake and a
# clone of mlc-llm (MLC_LLM_SOURCE_DIR), as in https://llm.mlc.ai/docs/deploy/android.html.
set -euo pipefail

die() { echo "compile.sh: $*" >&2; exit 1; }

[[ $# -ge 1 && $# -le 2 ]] || die "usage: compile.sh EXPORT_DIR [APP_DIST]"
export_dir=$(cd "$1" 2>/dev/null && pwd) || die "$1: no such folder"
[[ -f "$export_dir/mlc-package-config.json" ]] || die "$export_dir: no mlc-package-config.json (not a minicpm-edge android/harmony export)"

missing=()
command -v mlc_llm >/dev/null 2>&1 || missing+=("mlc_llm (install MLC LLM: https://llm.mlc.ai/docs/install/mlc_llm.html)")
command -v python3 >/dev/null 2>&1 || missing+=("python3")
[[ -n "${ANDROID_NDK:-}" && -f "${ANDROID_NDK:-}/build/cmake/android.toolchain.cmake" ]] \
  || missing+=("the Android NDK (set ANDROID_NDK to the NDK folder)")
[[ -n "${TVM_NDK_CC:-}" && -x "${TVM_NDK_CC:-}" ]] \
  || missing+=("TVM_NDK_CC (the NDK's aarch64-linux-android24-clang)")
[[ -n "${MLC_LLM_SOURCE_DIR:-}" && -d "${MLC_LLM_SOURCE_DIR:-}/android/mlc4j" ]] \
  || missing+=("MLC_LLM_SOURCE_DIR (a clone of github.com/mlc-ai/mlc-llm with its submodules)")
[[ -n "${JAVA_HOME:-}" && -x "${JAVA_HOME:-}/bin/java" ]] || missing+=("JAVA_HOME (the JDK bundled with Android Studio)")
command -v rustup >/dev/null 2>&1 || missing+=("rustup (Rust, to cross-compile the tokenizers)")
command -v cmake >/dev/null 2>&1 || missing+=("cmake")
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "compile.sh: cannot build the Android app; missing:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  echo "The weights in $export_dir are complete; install the above and run compile.sh again." >&2
  exit 1
fi

build=${MLC_BUILD_DIR:-$export_dir-build}
dist=${2:-$MLC_LLM_SOURCE_DIR/android/MLCChat/dist}
mkdir -p "$build/lib" "$dist"
build=$(cd "$build" && pwd)

# One model per export: read its id, library name and library path from the package config.
read -r model_id model_lib lib_tar < <(python3 - "$export_dir" "$build" <<'EOF'
import json, pathlib, sys
src, build = map(pathlib.Path, sys.argv[1:3])
cfg = json.loads((src / "mlc-package-config.json").read_text())
entry = cfg["model_list"][0]
libs = cfg["model_lib_path_for_prepare_libs"]
entry["model"] = str((src / entry["model"]).resolve())
libs = {k: str(build / v) for k, v in libs.items()}
cfg["model_lib_path_for_prepare_libs"] = libs
(build / "mlc-package-config.json").write_text(json.dumps(cfg, indent=2))
print(entry["model_id"], entry["model_lib"], libs[entry["model_lib"]])
EOF
)
[[ -f "$export_dir/$model_id/mlc-chat-config.json" ]] || die "$export_dir/$model_id: no mlc-chat-config.json"

echo "compile.sh: compiling $model_id for Android -> $lib_tar"
mlc_llm compile "$export_dir/$model_id/mlc-chat-config.json" --device android \
  --system-lib-prefix "${model_lib}_" -o "$lib_tar"

echo "compile.sh: packaging -> $dist"
cd "$build"
mlc_llm package --package-config mlc-package-config.json --mlc-llm-source-dir "$MLC_LLM_SOURCE_DIR" --output "$dist"

echo "compile.sh: done. Build the APK in Android Studio (project $MLC_LLM_SOURCE_DIR/android/MLCChat, or the folder"
echo "holding $dist), install it, then push the weights: targets/android/push_weights.sh $export_dir"
