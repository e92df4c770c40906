#!/usr/bin/env sh
# Prints the path of a Python >= 3.12 interpreter, or explains and fails.
# Order: $PYTHON, python3.12/python3.13 on PATH, then pyenv's 3.12+/3.13+.
# With PYTHON_MINOR=13 (say), only a Python 3.13 will do (make test-py3.13).
minor="${PYTHON_MINOR:-}"
if [ -n "$minor" ]; then
  want="sys.version_info[:2] == (3, $minor)"; what="Python 3.$minor"
else
  want="sys.version_info >= (3, 12)"; what="Python >= 3.12"
fi
ok() { "$@" -c "import sys; sys.exit(0 if $want else 1)" >/dev/null 2>&1; }
path_of() { "$@" -c 'import sys; print(sys.executable)'; }

if [ -n "${PYTHON:-}" ] && [ -z "$minor" ]; then
  if ok "$PYTHON"; then path_of "$PYTHON"; exit 0; fi
  echo "error: PYTHON=$PYTHON is not a working $what" >&2; exit 1
fi
for cand in ${minor:+python3.$minor} python3.12 python3.13 python3; do
  if command -v "$cand" >/dev/null 2>&1 && ok "$cand"; then path_of "$cand"; exit 0; fi
done
if command -v pyenv >/dev/null 2>&1; then
  for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])(\.[0-9]+)?$' | sort -t. -k2,2n -k3,3nr); do
    exe="$(pyenv root)/versions/$v/bin/python3"
    # The oldest supported minor first: 3.12 is what the pins are tested on.
    if [ -x "$exe" ] && ok "$exe"; then echo "$exe"; exit 0; fi
  done
fi
if [ -n "$minor" ]; then
  echo "error: no $what found. Install one (e.g. 'pyenv install 3.$minor')." >&2
else
  echo "error: no $what found. Install one (e.g. 'pyenv install 3.12'), or run 'make PYTHON=/path/to/python3.12 ...'." >&2
fi
exit 1
