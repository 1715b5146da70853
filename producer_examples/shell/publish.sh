#!/bin/sh
# Publish one mail job from a shell script or cron job with amqp-publish
# (Debian: apt-get install amqp-tools).
#
#   MAILBUS_AMQP_URL=amqp://user:pass@rabbit:5672/ ./publish.sh someone@example.org "Subject" "Text"
#
# Prints the job id. The body is built with printf; keep subject and text free of
# double quotes and backslashes, or build the JSON with jq.
set -eu
to=${1:?usage: publish.sh TO [SUBJECT] [TEXT]}
subject=${2:-Hello from the shell}
text=${3:-Sent by producer_examples/shell/publish.sh}
url=${MAILBUS_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672}
# amqp-tools reads a trailing "/" as the empty vhost; without it, the default vhost "/".
url=${url%/}
prefix=${MAILBUS_PREFIX:-mailbus}
id=shell-$(date +%s)-$$

printf '{"id":"%s","domain":"example.com","from":"app@example.com","to":["%s"],"subject":"%s","text":"%s"}' \
    "$id" "$to" "$subject" "$text" |
  amqp-publish --url="$url" --exchange="$prefix" --routing-key=send \
    --content-type=application/json --persistent
echo "$id"
