#!/bin/sh
# Rebuild the prebuilt JupyterLab extension that pip installs (see pyproject's data-files):
# writes ../../share/jupyter/labextensions/forkvm-branch/. Needs node >= 18 and a Python
# environment with jupyterlab (for `jupyter labextension build`).
set -eu
cd "$(dirname "$0")"
npm ci --no-audit --no-fund
npm run build:prod
