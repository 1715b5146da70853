#!/usr/bin/env bash
# Install what mailbus's embedded stack and tests need, once: Debian's rabbitmq-server,
# the producer examples' runtimes, PHPUnit, and a virtualenv (.venv) with mailbus and its dev
# extras (SecantusDB, hypothesis, ...). With "bench": also Postfix's smtp-sink and
# smtp-source, the benchmarks' C SMTP server and client (the MTA is left unconfigured).
set -euo pipefail
cd "$(dirname "$0")/../.."

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "bootstrap: need root (or sudo) to run: $*" >&2; exit 1
  fi
}

need_apt=()
ls /usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server >/dev/null 2>&1 \
  || need_apt+=(rabbitmq-server)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
# The producer examples' runtimes, each exercised by the tests: PHP with php-amqplib,
# amqp-tools and curl for shell scripts, Node.js with npm; nc for the daemon gateway.
[ -f /usr/share/php/PhpAmqpLib/autoload.php ] || need_apt+=(php-cli php-amqplib)
command -v amqp-publish >/dev/null || need_apt+=(amqp-tools)
command -v curl >/dev/null || need_apt+=(curl)
command -v nc >/dev/null || need_apt+=(netcat-openbsd)
# msmtp: a sendmail-compatible client of the SMTP gateway, as cron uses one.
command -v msmtp >/dev/null || need_apt+=(msmtp)
# PHPUnit and the PHP extensions it needs: the old SMTP mailer daemon's end-to-end suites
# run against the daemon gateway (tests/test_smtp_mailer_suites.py).
command -v phpunit >/dev/null || need_apt+=(phpunit)
dpkg -s php-xml >/dev/null 2>&1 || need_apt+=(php-xml)
dpkg -s php-mbstring >/dev/null 2>&1 || need_apt+=(php-mbstring)
# libfaketime: the reliability suite runs workers whose clocks are skewed.
dpkg -s libfaketime >/dev/null 2>&1 || need_apt+=(faketime)
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
if [ "${1:-}" = bench ] && [ ! -x /usr/sbin/smtp-sink ]; then
  need_apt+=(postfix)
  # "No configuration": nothing is set up or started, only the tools are wanted.
  echo "postfix postfix/main_mailer_type select No configuration" | as_root debconf-set-selections
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "bootstrap: installing ${need_apt[*]} from Debian"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # The private test broker is started by the harness; keep the packaged service off.
  as_root env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq \
    --no-install-recommends "${need_apt[@]}" >/dev/null
fi

stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: creating .venv with mailbus and its dev dependencies"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  log=$(mktemp)
  if ! .venv/bin/python -m pip install -e '.[dev]' >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; exit 1
  fi
  rm -f "$log"
  touch "$stamp"
fi
# The benchmark's Celery peer: a bench-only dependency.
if [ "${1:-}" = bench ] && ! .venv/bin/python -c 'import celery' 2>/dev/null; then
  echo "bootstrap: installing the benchmark's extras (Celery)"
  .venv/bin/python -m pip install -q -e '.[dev,bench]' >/dev/null
fi
