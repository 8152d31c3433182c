#!/usr/bin/env bash
# Deploy FedKeeper's functions to gcf from a federation config.
#   deploy/gcf/deploy.sh CONFIG.yaml            apply (needs the platform's CLI, logged in)
#   deploy/gcf/deploy.sh CONFIG.yaml --dry-run  print every manifest and command
set -euo pipefail
config="${1:?usage: $0 CONFIG.yaml [--dry-run]}"
shift
exec fedkeeper deploy gcf --config "$config" --build-dir "$(dirname "$0")/build" "$@"
