#!/bin/sh
# Publish one mail job over HTTP with curl, through the RabbitMQ management API's publish
# endpoint (the management plugin must be on; the user needs write access to the exchange).
#
#   MAILBUS_MANAGEMENT_URL=http://user:pass@rabbit:15672/ ./publish_http.sh someone@example.org "Subject" "Text"
#
# Prints the job id; exits 1 unless RabbitMQ answered {"routed":true}.
set -eu
to=${1:?usage: publish_http.sh TO [SUBJECT] [TEXT]}
subject=${2:-Hello over HTTP}
text=${3:-Sent by producer_examples/shell/publish_http.sh}
api=${MAILBUS_MANAGEMENT_URL:-http://guest:guest@127.0.0.1:15672/}
prefix=${MAILBUS_PREFIX:-mailbus}
vhost=${MAILBUS_VHOST:-%2F}
id=http-$(date +%s)-$$

job=$(printf '{"id":"%s","domain":"example.com","from":"app@example.com","to":["%s"],"subject":"%s","text":"%s"}' \
    "$id" "$to" "$subject" "$text")
# The job travels as a JSON string inside the API's request: escape its quotes.
payload=$(printf '%s' "$job" | sed 's/\\/\\\\/g; s/"/\\"/g')
answer=$(curl -fsS -X POST -H 'content-type: application/json' \
  "${api%/}/api/exchanges/$vhost/$prefix/publish" \
  -d "{\"routing_key\":\"send\",\"payload\":\"$payload\",\"payload_encoding\":\"string\",
       \"properties\":{\"delivery_mode\":2,\"content_type\":\"application/json\",\"message_id\":\"$id\"}}")
case $answer in
  *'"routed":true'*) echo "$id" ;;
  *) echo "not routed: $answer" >&2; exit 1 ;;
esac
