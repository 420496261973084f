#!/usr/bin/env bash
# The quality benchmark on a lent GPU machine in one call (docs/benchmark.md, "On a lent GPU").
#   here, first:  make device-wheels
#   then the device tool's run: command "bash benchmarks/on_device.sh --archs convnext vit",
#                               carry [".whl"], timeout_s 600
# Installs the carried packages (benchmarks/device_wheels.py), runs benchmarks/quality.py
# --preset $PRESET (default cuda-224) with the arguments given, interrupted BUDGET_S seconds in
# (default 540: each architecture's results are written as it finishes), and puts the report, its
# JSON, the figures (one tar), the log and the GPU's name under $OUT, whatever happened.
set -uo pipefail
: "${OUT:?OUT must name the folder whose files come back}"
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
PRESET=${PRESET:-cuda-224}
compgen -G ".whl/*.whl" >/dev/null && [ -d .whl/data_store ] || { echo "on_device.sh: no packages in .whl/: run 'make device-wheels' here and carry .whl" >&2; exit 2; }
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
cp -r .whl/data_store "$SITE"/ || exit 1
export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi"; } > "$OUT/device.txt" 2>&1
timeout --signal=INT "${BUDGET_S:-540}" "$PYTHON" benchmarks/quality.py --preset "$PRESET" "$@" 2>&1 | tee "$OUT/quality.log"
status=${PIPESTATUS[0]}
[ "$status" = 124 ] && echo "on_device.sh: stopped at BUDGET_S=${BUDGET_S:-540} s; the report holds the architectures that finished" | tee -a "$OUT/quality.log"
shopt -s nullglob
# a real run's report and figures go to docs/, a dry run's (--dry-run) beside its JSON
reports=(docs/quality_"$PRESET"*.md benchmarks/results/quality_"$PRESET"*.md benchmarks/results/quality_"$PRESET"*.json)
figures=(docs/images/quality_"$PRESET"[_-]* benchmarks/results/images/quality_"$PRESET"-dry_*)
[ ${#reports[@]} -gt 0 ] && cp "${reports[@]}" "$OUT"/
[ ${#figures[@]} -gt 0 ] && tar -cf "$OUT/figures.tar" "${figures[@]}"
exit "$status"
