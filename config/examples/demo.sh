#!/usr/bin/env bash
# Runs an example job end to end on this machine: makes N products (default 100000), starts two
# consumers, dispatches the run, prints its status and stops the consumers.
#   config/examples/demo.sh [N] [JOB]      JOB: inflate-prices (default), copy-to-files
# Needs RabbitMQ on AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f) and python3 for the
# inflate-prices script.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
n=${1:-100000}
job="$here/${2:-inflate-prices}.toml"

cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p hopper-dispatcher -p hopper-consumer
bin="${CARGO_TARGET_DIR:-$root/target}/release"

mkdir -p "$here/data"
awk -v n="$n" 'BEGIN {
  for (i = 1; i <= n; i++)
    printf "{\"id\":%d,\"name\":\"product %d\",\"price\":%d.%02d}\n", i, i, i % 500, i % 100
}' > "$here/data/products.jsonl"
echo "made $n products in $here/data/products.jsonl"

"$bin/hopper-consumer" "$job" --concurrency 4 2> "$here/data/consumer-1.log" & c1=$!
"$bin/hopper-consumer" "$job" --concurrency 4 2> "$here/data/consumer-2.log" & c2=$!
trap 'kill -TERM $c1 $c2 2>/dev/null; wait $c1 $c2 2>/dev/null || true' EXIT

code=0
"$bin/hopper-dispatcher" run "$job" || code=$?
echo
"$bin/hopper-dispatcher" status "$job"
exit $code
