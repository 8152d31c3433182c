#!/usr/bin/env bash
# Deploy FedKeeper's functions to aws from a federation config.
#   deploy/aws/deploy.sh CONFIG.yaml            apply (needs the platform's CLI, logged in)
#   deploy/aws/deploy.sh CONFIG.yaml --dry-run  print every manifest and command
set -euo pipefail
config="${1:?usage: $0 CONFIG.yaml [--dry-run]}"
shift
exec fedkeeper deploy lambda --config "$config" --build-dir "$(dirname "$0")/build" "$@"
