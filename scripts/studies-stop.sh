#!/usr/bin/env bash
# Stops the study workers of scripts/studies.sh cleanly before a session ends, then stages what
# the next session needs: one SIGINT to each `mlbench run ... --store studies/...` process (a
# cell in training checkpoints at its next step; a cell being evaluated finishes its evaluation
# first, up to about 5 minutes on 2 cores), a wait until they have ended, scripts/studies-save.sh.
# A single signal: a second one more than a second later would end a worker without its
# checkpoint. studies.sh itself ends once its workers have.
#   scripts/studies-stop.sh && git commit -m "studies: cells so far"
set -euo pipefail
cd "$(dirname "$0")/.."
pids=$(pgrep -f -- ' run .*--store studies/' || true)
if [ -z "$pids" ]; then
  echo "studies-stop.sh: no study worker running" >&2
else
  echo "studies-stop.sh: stopping $(echo $pids | wc -w) worker(s): $(echo $pids)" >&2
  kill -INT $pids 2>/dev/null || true
  t0=$SECONDS
  while :; do
    alive=0
    for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" -eq 0 ] && break
    if [ $(((SECONDS - t0) % 60)) -eq 0 ] && [ $((SECONDS - t0)) -gt 0 ]; then
      echo "studies-stop.sh: still waiting after $((SECONDS - t0)) s (an evaluation finishing)" >&2
    fi
    sleep 1
  done
  echo "studies-stop.sh: workers ended after $((SECONDS - t0)) s" >&2
fi
scripts/studies-save.sh
