#!/usr/bin/env bash
# Wheels the device machine lacks (its python3 is 3.12, x86-64, no registry), into .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
for package in "annotated-types==0.7.0" "pydantic==2.13.4" "pydantic-core==2.46.4" "typing-inspection==0.4.2" "typer==0.28.0"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$package"
done
ls -la .whl
