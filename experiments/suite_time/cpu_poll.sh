#!/usr/bin/env bash
# usage: cpu_poll.sh PID OUT
# Every 3 s until PID ends, writes to OUT the CPU time (clock ticks, 1/100 s) of PID and of its
# children and grandchildren (pytest and its xdist workers; a worker's own waited-for
# subprocesses through its cutime/cstime), each process counted at the largest value seen.
# On a machine shared with other jobs a run's CPU time compares better than its wall time.
root=$1; out=$2
declare -A best
while kill -0 "$root" 2>/dev/null; do
  for p in $root $(pgrep -P "$root") $(for c in $(pgrep -P "$root"); do pgrep -P "$c"; done); do
    [ -r "/proc/$p/stat" ] || continue
    if [ "$p" = "$root" ]; then fields='{print $14+$15}'; else fields='{print $14+$15+$16+$17}'; fi
    t=$(awk "$fields" "/proc/$p/stat" 2>/dev/null)
    if [ -n "$t" ] && { [ -z "${best[$p]}" ] || [ "$t" -gt "${best[$p]}" ]; }; then best[$p]=$t; fi
  done
  s=0; for k in "${!best[@]}"; do s=$((s + best[$k])); done
  echo "$s" > "$out"
  sleep 3
done
