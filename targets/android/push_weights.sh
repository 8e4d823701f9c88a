#!/usr/bin/env bash
# Copy the MLC weights of an export to a connected phone, where the MLCChat app looks for them.
#
#   targets/android/push_weights.sh EXPORT_DIR [APP_ID]
#
# APP_ID is the app's package name (default ai.mlc.mlcchat). Each <model_id>/ folder of the export goes to
# /storage/emulated/0/Android/data/APP_ID/files/<model_id>/ through /data/local/tmp, as mlc-llm's bundle_weight.py does.
# With several devices attached, choose one with ANDROID_SERIAL=<serial>.
set -euo pipefail

die() { echo "push_weights.sh: $*" >&2; exit 1; }

[[ $# -ge 1 && $# -le 2 ]] || die "usage: push_weights.sh EXPORT_DIR [APP_ID]"
export_dir=$(cd "$1" 2>/dev/null && pwd) || die "$1: no such folder"
app=${2:-ai.mlc.mlcchat}
models=()
for d in "$export_dir"/*/; do
  [[ -f "$d/mlc-chat-config.json" && -f "$d/tensor-cache.json" ]] && models+=("${d%/}")
done
[[ ${#models[@]} -gt 0 ]] || die "$export_dir: no model folder (with mlc-chat-config.json and tensor-cache.json) inside"

command -v adb >/dev/null 2>&1 || die "adb not found on PATH; install Android platform-tools (https://developer.android.com/tools/releases/platform-tools)"
devices=$(adb devices | awk 'NR > 1 && $2 == "device" {print $1}')
if [[ -z "${ANDROID_SERIAL:-}" ]]; then
  count=$(printf '%s' "$devices" | grep -c . || true)
  [[ $count -ge 1 ]] || die "no phone attached (adb devices lists none in state 'device'); connect one with USB debugging on"
  [[ $count -eq 1 ]] || die "$count devices attached; choose one with ANDROID_SERIAL=<serial>"
fi

dest=/storage/emulated/0/Android/data/$app/files
adb shell mkdir -p "$dest"
for m in "${models[@]}"; do
  id=$(basename "$m")
  echo "push_weights.sh: $id -> $dest/$id"
  adb shell rm -rf "/data/local/tmp/$id"
  adb push "$m" "/data/local/tmp/$id"
  adb shell rm -rf "$dest/$id"
  adb shell mv "/data/local/tmp/$id" "$dest/"
done
echo "push_weights.sh: done; open the app and pick the model."
