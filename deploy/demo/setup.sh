#!/bin/sh
# The demo's data, through the outbox CLI: a webhook of account acct_demo for lead.scored
# pointing at DEMO_RECEIVER_URL (made on the first run only), then one event.
set -eu
: "${DEMO_RECEIVER_URL:?}" "${DEMO_SECRET:?}"

if ! outbox webhooks list --account acct_demo --json |
	python -c 'import json, sys; sys.exit(not any(w["name"] == "Demo receiver" for w in json.load(sys.stdin)))'; then
	id=$(outbox webhooks add --account acct_demo --name "Demo receiver" --event lead.scored \
		--url "$DEMO_RECEIVER_URL" --secret "$DEMO_SECRET")
	echo "made webhook $id for $DEMO_RECEIVER_URL"
fi
id=$(outbox emit acct_demo lead.scored '{"lead": {"id": 42, "name": "Ada Lovelace"}, "score": {"overall": 87}}')
echo "emitted event $id: the receiver prints the delivery"
