#!/usr/bin/env bash
# The project's test command (README): build the CPU environment if needed, then run the whole suite.
#   bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
bash tests/setup_cpu.sh "$VENV"
# In-process vLLM engine, no inductor compile (docs/cpu.md); conftest.py sets these too.
export TORCH_COMPILE_DISABLE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
# One OpenMP thread per process: the suite starts 2-rank torchrun jobs on a 2-core machine, and spinning OpenMP
# workers that outnumber the cores made updates ~15x slower (measured; see train.py's tests).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a broken suite here, not a pass.
[ $rc -eq 5 ] && echo "run.sh: pytest collected no tests" >&2
exit $rc
