#!/usr/bin/env bash
# Refreshes the copies of report files in README.md: a block
#   <!-- include: reports/sib200-multilingual/verdicts.md -->
#   ...
#   <!-- /include -->
# is replaced by the named file's current text (paths from the repository root). Run after
# writing reports (scripts/study-reports.sh does); tests/docs.rs fails while a copy is stale, so
# the README's tables are the committed reports' tables.
set -euo pipefail
cd "$(dirname "$0")/.."
readme=${1:-README.md}
awk '
  /^<!-- include: [^ ]+ -->$/ {
    print
    path = $3
    r = (getline line < path)
    if (r < 0) { printf "readme-includes.sh: %s:%d: cannot read %s\n", FILENAME, FNR, path > "/dev/stderr"; bad = 1; exit 2 }
    if (r > 0) print line
    while (r > 0 && (getline line < path) > 0) print line
    close(path)
    inside = 1
    next
  }
  /^<!-- \/include -->$/ { if (!inside) { printf "readme-includes.sh: %s:%d: /include without include\n", FILENAME, FNR > "/dev/stderr"; bad = 1; exit 2 } inside = 0 }
  !inside { print }
  END { if (!bad && inside) { printf "readme-includes.sh: %s: include block not closed\n", FILENAME > "/dev/stderr"; exit 2 } }
' "$readme" >"$readme.tmp" || { rm -f "$readme.tmp"; exit 2; }
mv "$readme.tmp" "$readme"
