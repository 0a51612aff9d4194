#!/usr/bin/env bash
# Fetch, here, the wheels benchmarks/gpu.py needs on a lent GPU machine whose image lacks them (Python 3.12,
# x86-64: pydantic, bitsandbytes, optuna and their needs; torch, transformers, accelerate, peft, typer, rich and
# nvidia-ml-py are there). They land in .whl/ (git-ignored through .git/info/exclude) and travel with `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for n in 2_28 2_27 2_24 2_17 2014 1; do
  case $n in 2014|1) platforms+=(--platform "manylinux${n}_x86_64");; *) platforms+=(--platform "manylinux_${n}_x86_64");; esac
done
for pkg in pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
           bitsandbytes==0.50.2 optuna==5.1.0 alembic==1.20.1 sqlalchemy==2.1.9 colorlog==6.12.0 mako==1.4.3 \
           greenlet; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$pkg"
done
ls -la .whl
