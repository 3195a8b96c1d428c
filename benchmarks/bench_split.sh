#!/usr/bin/env bash
# `nsa bench` spread over the GPUs of one host: one process per group of configurations, group i on GPU i, each
# resuming the same earlier bench.json (or starting afresh with RESUME=""), then one table merged from their parts.
# Usage (from the repository root): RESUME=run1.json BUDGET=480 bash benchmarks/bench_split.sh DIR paper d128,fla g4
# Each part goes to DIR/part<i>/ with its log; DIR/bench.json and the plots are the merge (nsa bench --merge).
# PYTHON picks the interpreter (default python3).
set -uo pipefail
export PYTHONUNBUFFERED=1
out=$1; shift
mkdir -p "$out"
pids=(); parts=()
i=0
for group in "$@"; do
  part="$out/part$i"; mkdir -p "$part"
  CUDA_VISIBLE_DEVICES=$i timeout "${LIMIT:-570}" "${PYTHON:-python3}" -m nsa.bench --configs "$group" --budget "${BUDGET:-480}" \
    ${RESUME:+--resume "$RESUME"} --out "$part" >"$part/bench.log" 2>&1 &
  pids+=($!); parts+=("$part/bench.json"); i=$((i + 1))
done
for pid in "${pids[@]}"; do wait "$pid"; done
"${PYTHON:-python3}" -m nsa.bench --merge "${parts[@]}" --out "$out" 2>&1 | tail -n 120
