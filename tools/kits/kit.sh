# Sourced (bash) on the GPU machine, one call per part of a kit made by tools/kits/make-kit:
#   source .kits/NAME/K/kit.sh [&& python3 -m pytest ...]
# Keeps this part under /tmp/kits/NAME; once all are there, unpacks the kit once per machine, puts it
# (and the paths it names) and the project's root on PYTHONPATH, and runs its import check. Until then it
# says which parts are missing and returns 1, so a command chained with && runs only on a complete kit.
_part=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
_name=$(basename "$(dirname "$_part")")
_root=$(cd "$_part/../../.." && pwd)
_state=/tmp/kits/$_name
_all=$(seq 1 "$(cat "$_part/parts")")
if [ ! -e "$_state/site/.ready" ]; then
  mkdir -p "$_state/parts" && cp "$_part"/site.tar.xz.* "$_state/parts/"
  _missing=$(for i in $_all; do [ -e "$_state/parts/site.tar.xz.$i" ] || printf '%s ' "$i"; done)
  if [ -n "$_missing" ]; then
    echo "kit $_name: part $(basename "$_part") kept; parts still to send: $_missing"
    return 1
  fi
  mkdir -p "$_state/site" && (for i in $_all; do cat "$_state/parts/site.tar.xz.$i"; done) | xz -d \
    | tar -x -C "$_state/site" && touch "$_state/site/.ready" || return 1
fi
_paths=$_state/site
while read -r _p; do [ -n "$_p" ] && _paths=$_paths:$_state/site/$_p; done < "$_part/paths"
export PYTHONPATH="$_root:$_paths${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python3 "$_part/check.py"
