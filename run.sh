#!/usr/bin/env bash
# One entry point: `./run.sh main [args]` runs the full TruthfulQA job, `./run.sh test` the test suite.
# Both first set up .venv (scripts/setup.sh) so they work on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")"
# The library reads TruthfulQA from $HPR_TRUTHFULQA_DIR when no folder is passed; this checkout's data
# lives beside it in ../shared (used only when the variable is unset and the folder is there).
if [ -z "${HPR_TRUTHFULQA_DIR:-}" ]; then
  shared_truthfulqa="$(cd .. && pwd)/shared/data/truthfulqa"
  if [ -d "$shared_truthfulqa" ]; then
    export HPR_TRUTHFULQA_DIR="$shared_truthfulqa"
  fi
fi
command=${1:-}
shift || true
case "$command" in
  main)
    case " $* " in *" gemma3 "*|*"--model=gemma3"*) export HPR_SETUP_GEMMA=1 ;; esac
    bash scripts/setup.sh
    exec .venv/bin/hpr-peft main "$@"
    ;;
  test)
    bash scripts/setup.sh
    exec .venv/bin/python -m pytest -q "$@"
    ;;
  *)
    echo "usage: ./run.sh main [--model smollm2|gemma3] [--output DIR] ...  |  ./run.sh test [pytest args]" >&2
    exit 2
    ;;
esac
