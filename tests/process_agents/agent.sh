#!/usr/bin/env bash
# A bash + curl agent: one chat call, then the reward printed as the last stdout line.
set -euo pipefail
body='{"messages": [{"role": "user", "content": "say hi"}], "max_tokens": 3}'
reply=$(curl -sS --fail-with-body -H "Content-Type: application/json" \
  -H "Authorization: Bearer $OPENAI_API_KEY" -d "$body" "$OPENAI_BASE_URL/chat/completions")
echo "model said: $reply" >&2
echo '{"reward": 0.5}'
