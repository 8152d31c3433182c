#!/usr/bin/env bash
# Deploy FedKeeper's functions to openfaas from a federation config.
#   deploy/openfaas/deploy.sh CONFIG.yaml            apply (needs the platform's CLI, logged in)
#   deploy/openfaas/deploy.sh CONFIG.yaml --dry-run  print every manifest and command
set -euo pipefail
config="${1:?usage: $0 CONFIG.yaml [--dry-run]}"
shift
exec fedkeeper deploy openfaas --config "$config" --build-dir "$(dirname "$0")/build" "$@"
