#!/usr/bin/env bash
# Regenerate dashboard.schema.json from Grafana's own TypeScript types.
#
# @grafana/schema ships only .d.ts/.js (no JSON Schema, no CUE), so we turn its raw dashboard
# type into a JSON Schema once and commit the result: the tests then need only Python's
# jsonschema, not node. Run this when bumping GRAFANA_SCHEMA_VERSION, and commit the diff.
#
# The raw type file is used on purpose: the exported veneer type fails with
# 'Type "DataSourceRef" has multiple definitions'.
#
# Usage: dashboards/schema/regenerate.sh            (needs node + npm and the npm registry)
set -euo pipefail

GRAFANA_SCHEMA_VERSION="${GRAFANA_SCHEMA_VERSION:-13.2.3}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cd "$work"
npm init -y >/dev/null
npm install --no-audit --no-fund --silent \
    "@grafana/schema@${GRAFANA_SCHEMA_VERSION}" "typescript@5.9.3" "ts-json-schema-generator@2.4.0"
npx --no-install ts-json-schema-generator --no-type-check \
    --path node_modules/@grafana/schema/dist/types/raw/dashboard/x/types.gen.d.ts \
    --type Dashboard \
    -o dashboard.schema.json
cp dashboard.schema.json "$here/dashboard.schema.json"
echo "wrote $here/dashboard.schema.json from @grafana/schema@${GRAFANA_SCHEMA_VERSION}"
