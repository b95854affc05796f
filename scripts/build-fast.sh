#!/usr/bin/env bash
# Compiles burrow's data path (the wire codec and session, the asyncio session, bridges,
# joins and channels, the HTTP agent's parser, fast path and visitor) with mypyc, in place:
# the compiled modules sit beside their sources and Python loads them first. The same code
# runs as plain Python without this step (BURROW_PURE=1 removes the compiled modules).
# Rebuilds only when a source changed; needs gcc and the Python headers.
set -euo pipefail
cd "$(dirname "$0")/.."
modules=(
  burrow/wire/frames.py
  burrow/wire/session.py
  burrow/net/outbox.py
  burrow/net/connection.py
  burrow/net/bridge.py
  burrow/net/join.py
  burrow/net/channel.py
  burrow/http/fastparse.py
  burrow/http/fastpath.py
  burrow/http/framing.py
  burrow/http/policy.py
  burrow/http/visitor.py
  burrow/http/record.py
)
clean() {
  find src/burrow -name '*.so' -delete
  find src -maxdepth 1 -name '*__mypyc*.so' -delete
}
if [ "${BURROW_PURE:-}" = "1" ]; then
  clean
  exit 0
fi
sum=$(cd src && cat "${modules[@]}" | sha256sum | cut -c1-16)
stamp=".venv/.burrow-fast-$sum"
if [ -f "$stamp" ] && ls src/burrow/wire/session.*.so >/dev/null 2>&1; then
  # Built from these very sources. A checkout that rewrote one with the same content (git
  # rebase, stash) left it newer than its compiled module, which burrow then refuses to load
  # (burrow/compiled.py): mark the compiled modules current instead of leaving that refusal.
  for m in "${modules[@]}"; do
    for so in src/"${m%.py}".*.so; do
      if [ -e "$so" ] && [ "src/$m" -nt "$so" ]; then
        touch "$so"
      fi
    done
  done
  exit 0
fi
clean
if [ ! -x .venv/bin/mypyc ]; then  # the compiler comes with mypy (the test extra has it too)
  echo "build-fast: installing mypy for its compiler, mypyc" >&2
  if ! .venv/bin/python -m pip install -q "mypy>=1.10" >/tmp/burrow-mypyc.log 2>&1; then
    echo "build-fast: mypy could not be installed (see /tmp/burrow-mypyc.log); burrow runs as plain Python" >&2
    exit 0
  fi
fi
echo "build-fast: compiling the data path with mypyc (once, a minute or two)" >&2
if ! (cd src && ../.venv/bin/mypyc "${modules[@]}" >/tmp/burrow-mypyc.log 2>&1); then
  echo "build-fast: mypyc failed (see /tmp/burrow-mypyc.log); burrow runs as plain Python" >&2
  clean
  rm -rf src/build
  exit 0
fi
rm -rf src/build
rm -f .venv/.burrow-fast-*
touch "$stamp"
