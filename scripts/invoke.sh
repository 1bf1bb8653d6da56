#!/usr/bin/env bash
# Runs the function locally on one sample event, with no AWS account:
#   1. starts the MediaPackage VOD emulator on 127.0.0.1 (ephemeral port),
#   2. starts moto's SQS on 127.0.0.1 (ephemeral port) with the sample events' queues, each
#      with a dead-letter queue in its redrive policy,
#   3. runs the function under `cargo lambda watch`, pointed at both through
#      AWS_ENDPOINT_URL_MEDIAPACKAGE_VOD and AWS_ENDPOINT_URL_SQS,
#   4. invokes it with $EVENT and prints the batch response,
#   5. prints what the emulator holds and what the dead-letter queues hold, and stops everything
#      it started.
# Usage: scripts/invoke.sh [events/file.json]   (EMULATOR_ARGS adds emulator options)
set -euo pipefail
cd "$(dirname "$0")/.."

EVENT=${1:-${EVENT:-events/mixed.json}}
[ -f "$EVENT" ] || { echo "invoke: no event file $EVENT" >&2; exit 2; }
export PATH="$PWD/.venv/bin:$PATH"
command -v cargo-lambda >/dev/null || { echo "invoke: cargo-lambda missing; run 'make venv'" >&2; exit 2; }
command -v moto_server >/dev/null || { echo "invoke: moto missing; run 'make venv'" >&2; exit 2; }

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "==> building"
# Built as `cargo lambda watch` builds it (same package, same features), so it starts at once.
cargo build --quiet --bin bootstrap
cargo build --quiet -p mpvod-emulator

echo "==> starting the MediaPackage VOD emulator"
# shellcheck disable=SC2086
target/debug/mpvod-emulator --packaging-group vod-group --max-lifetime 600 ${EMULATOR_ARGS:-} \
  >"$work/emulator.out" 2>"$work/emulator.log" &
pids+=($!)
for _ in $(seq 100); do
  grep -q "listening on" "$work/emulator.out" 2>/dev/null && break
  sleep 0.1
done
url=$(sed -n 's/.*listening on //p' "$work/emulator.out")
[ -n "$url" ] || { cat "$work/emulator.log" >&2; echo "invoke: the emulator did not start" >&2; exit 1; }
echo "    $url"

sqs_port=$(free_port)
sqs="http://127.0.0.1:$sqs_port"
echo "==> starting SQS (moto) with the sample queues and their dead-letter queues"
moto_server -H 127.0.0.1 -p "$sqs_port" >"$work/moto.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do
  (exec 3<>"/dev/tcp/127.0.0.1/$sqs_port") 2>/dev/null && break
  sleep 0.1
done
# moto's account is 123456789012, the one in the sample events' queue ARNs.
SQS="$sqs" python3 scripts/local_queues.py create
echo "    $sqs"

port=$(free_port)
echo "==> starting the function under cargo lambda watch on 127.0.0.1:$port"
# The sample events' receipt handles belong to no real delivery, so a message to retry has its
# visibility change refused (logged as "could not delay redelivery"); poison messages do reach
# the local dead-letter queue. Nothing reaches beyond this machine.
AWS_ENDPOINT_URL_MEDIAPACKAGE_VOD="$url" AWS_ENDPOINT_URL_SQS="$sqs" \
AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_EC2_METADATA_DISABLED=true \
PACKAGING_GROUP_ID="${PACKAGING_GROUP_ID:-vod-group}" \
SOURCE_ROLE_ARN="${SOURCE_ROLE_ARN:-arn:aws:iam::123456789012:role/MediaPackageVodSourceRead}" \
ALLOWED_SOURCE_BUCKETS="${ALLOWED_SOURCE_BUCKETS:-media-masters}" \
RUST_LOG="${RUST_LOG:-info}" \
  cargo lambda watch --quiet --ignore-changes -A 127.0.0.1 -P "$port" --bin bootstrap \
  >"$work/function.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

echo "==> invoking with $EVENT"
# As SQS would deliver it now: the sample's SentTimestamp and ApproximateFirstReceiveTimestamp
# are set to the present (a first receive long ago leaves no visibility time to delay a retry).
python3 - "$EVENT" >"$work/event.json" <<'PY'
import json, sys, time
event = json.load(open(sys.argv[1]))
now = str(int(time.time() * 1000))
for record in event.get("Records", []):
    attributes = record.setdefault("attributes", {})
    for name in ("SentTimestamp", "ApproximateFirstReceiveTimestamp"):
        if name in attributes:
            attributes[name] = now
json.dump(event, sys.stdout)
PY
if ! cargo lambda invoke bootstrap --invoke-address 127.0.0.1 --invoke-port "$port" \
    --data-file "$work/event.json" >"$work/response.json" 2>"$work/invoke.err"; then
  cat "$work/invoke.err" "$work/function.log" >&2
  echo "invoke: the invocation failed" >&2
  exit 1
fi

echo "==> function log"
grep -E 'Lambda runtime invoke|ERROR' "$work/function.log" | sed -E 's/invoke\{requestId="[^"]*" xrayTraceId="[^"]*"\}/invoke/; s/^ */    /' || true
echo "==> batch response (the messages SQS would deliver again)"
python3 -m json.tool "$work/response.json"
echo "==> assets the emulator now holds"
curl -fsS "$url/_emulator/assets" | python3 -c '
import json, sys
assets = json.load(sys.stdin)["assets"]
for a in assets:
    print("    %-40s %-12s %s" % (a["id"], a["packagingGroupId"], a["sourceArn"]))
print(f"    ({len(assets)} assets)")'
curl -fsS "$url/_emulator/stats" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print("==> emulator calls: " + ", ".join(f"{k} {v}" for k, v in s.items()))'
echo "==> dead-letter queues (poison messages, sent at once with their reason)"
SQS="$sqs" python3 scripts/local_queues.py show
