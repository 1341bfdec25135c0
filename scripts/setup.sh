#!/usr/bin/env bash
# Create .venv and install the service into it, editable. Usage: scripts/setup.sh [EXTRA[,EXTRA...]], e.g. dev
# torch is pinned by constraints.txt: here pip takes the CPU wheel on disk, elsewhere the normal PyPI wheel.
# pip runs only when needed: .venv/.rl-service-install records what the last install was made from, and a start
# with the same pyproject.toml and constraints.txt asking for no new extra skips pip and prints nothing.
# The install is editable, so code changes need no reinstall. Delete the stamp (or .venv) to force one.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.rl-service-install
# cksum: POSIX, so present everywhere; the stamp only needs to notice an edit, not resist forgery.
requirements=$(cat pyproject.toml constraints.txt | cksum | tr -s ' ' '-')
requested=${1:-}
installed=
if [ -f "$stamp" ] && [ -x .venv/bin/python ]; then
  read -r stamp_requirements installed < "$stamp" || true
  if [ "$stamp_requirements" = "$requirements" ]; then
    missing=
    for extra in ${requested//,/ }; do
      case ",$installed," in *",$extra,"*) ;; *) missing=yes ;; esac
    done
    [ -z "$missing" ] && exit 0
  fi
fi
# Install the union of the extras installed before and those asked for, so that serve.sh after test.sh keeps dev.
extras=$(echo "$installed,$requested" | tr , '\n' | sed '/^$/d' | sort -u | paste -sd, -)
# One line, so that a first run's minute of quiet pip is not mistaken for a hang.
echo "setup.sh: installing rl-service${extras:+[$extras]} into .venv" >&2
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
rm -f "$stamp"  # a failed install must not leave a stamp saying it succeeded
# --quiet still shows warnings and errors. The one filtered out is setuptools' note that an editable install of
# two source roots (. and generated/) uses an import finder: true of every such install, and nothing to act on.
PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore:Editable installation" \
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".${extras:+[$extras]}"
echo "$requirements $extras" > "$stamp"
