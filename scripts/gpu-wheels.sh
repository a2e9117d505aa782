#!/usr/bin/env bash
# What `genssd bench gpu` needs on a GPU machine that has torch, transformers, peft, accelerate,
# anyio, httpx, typer, rich, pyyaml, pandas, pyarrow, xxhash … but no network and none of the
# packages below: cp312 manylinux x86-64 wheels, pinned to the versions this project is tested
# with (inside pyproject's ranges), downloaded into the ignored folder .whl/, plus the student's
# tokenizer in .whl/tokenizer/ (the GPU machine cannot fetch one; the random-init shapes use it).
# vllm and gguf are left out: the first is far too large to carry, the second is only for
# loading GGUF files, which the check does not do.
#
#   scripts/gpu-wheels.sh            # or: make gpu-wheels
# On the GPU machine, from the checkout (the wheels travel with it):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${GPU_WHEELS_DIR:-.whl}
PYTHON=${PYTHON:-.venv/bin/python}  # genssd's own venv here: it writes the tokenizer folder

WHEELS=(
    # genssd's config and records (imported by every command)
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0  # pydantic needs >= 4.16
    # the teacher client (`genssd run`, `genssd bench engine`)
    openai==3.57.0 jiter==0.19.0 sniffio==1.3.1 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
    idna==3.20 anyio==4.16.0 tenacity==9.2.1 aiolimiter==1.3.0
    # `genssd train` / `genssd bench train`: TRL and its datasets
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    # answer checking (`genssd run`, `genssd eval`)
    math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
)

mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"

# One version of each package, or the install into one target stops: drop wheels of other versions
# left by an earlier download.
keep=$(printf '%s\n' "${WHEELS[@]}" | sed 's/==/-/; s/[-_.]/_/g' | tr '[:upper:]' '[:lower:]')
for wheel in "$DEST"/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1-2 | tr '[:upper:]' '[:lower:]' | sed 's/[-_.]/_/g')
    grep -qx "$name" <<<"$keep" || { echo "removing $wheel (not in the pinned list)"; rm -f "$wheel"; }
done

# The tokenizer: the shipped student's (SmolLM2, Apache-2.0), converted here once if needed.
"$PYTHON" - "$DEST/tokenizer" <<'EOF'
import shutil
import sys
from pathlib import Path

from genssd_cli.models import student_model_dir

source, target = student_model_dir("smollm2-135m-instruct"), Path(sys.argv[1])
target.mkdir(parents=True, exist_ok=True)
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
    if (source / name).exists():
        shutil.copy2(source / name, target / name)
print(f"tokenizer: {source} -> {target}")
EOF

ls -1 "$DEST"
du -sh "$DEST"
