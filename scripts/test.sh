#!/usr/bin/env bash
# The test command README.md gives: set up a bare machine, then lint, type-check and run the whole suite
# against the real engine. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ruff check orchestrator tests bench
mypy orchestrator
# the store's tests also run against a real PostgreSQL: a private server started here
PIPE_TEST_POSTGRES_URL=${PIPE_TEST_POSTGRES_URL:-$(bash scripts/postgres.sh)}
export PIPE_TEST_POSTGRES_URL
# the remote store's tests run against a real S3 server: a private Ceph radosgw on loopback, started here
if [ -z "${PIPE_TEST_S3_ENDPOINT:-}" ]; then set -a; eval "$(bash scripts/s3.sh)"; set +a; fi
# the swarm executor's tests run on a real 3-node swarm: private dockerds in network namespaces, started here
CLEANUP=()
trap 'for step in "${CLEANUP[@]}"; do eval "$step" >/dev/null 2>&1 || true; done' EXIT
if [ -z "${PIPE_TEST_SWARM_HOST:-}" ]; then
  set -a; eval "$(bash scripts/cluster.sh up)"; set +a
  CLEANUP+=("bash scripts/cluster.sh down")
fi
export AWS_EC2_METADATA_DISABLED=true
# the kubernetes executor's contract runs against a real cluster (built once, then reused from /var/cache/pipe-k8s)
# inside a network namespace with no route out; its tests run there, everything else here
bash scripts/k8s/build.sh
K8S_STATE=$(mktemp -d /tmp/pipe-k8s.XXXX); CLEANUP+=("bash scripts/k8s/down.sh $K8S_STATE")
bash scripts/k8s/up.sh "$K8S_STATE" >/dev/null
python3 -m pytest -m "not k8s" "$@"
(set -a; . "$K8S_STATE/env"; ip netns exec "$K8S_NS" env PIPE_TEST_KUBECONFIG="$KUBECONFIG" \
   PIPE_TEST_K8S_S3_ENDPOINT="$PIPE_K8S_S3_ENDPOINT" PIPE_TEST_K8S_S3_URL="$PIPE_K8S_S3_URL" \
   PIPE_TEST_K8S_NODE_DOCKER="$PRIVATE_DOCKER_HOST" python3 -m pytest -m k8s "$@")
