#!/usr/bin/env bash
# The one entrypoint of every container (see docker/Dockerfile), by its first argument:
#
#   master              a Spark standalone master on $SPARK_HOST:$SPARK_MASTER_PORT (web UI $SPARK_MASTER_WEBUI_PORT)
#   worker              a Spark worker of $SPARK_WORKER_CORES cores and $SPARK_WORKER_MEMORY, joining $SPARK_MASTER_URL
#   master-and-worker   both in one container (the 2017 "spmaster"); stops both when either ends
#   driver [ARGS...]    python examples/mnist.py --master $SPARK_MASTER_URL ARGS (the driver advertises
#                       $SPARK_HOST to the executors; its RPC, block-manager and parameter-server ports
#                       are $SPARK_DRIVER_PORT, $SPARK_BLOCK_MANAGER_PORT and $KERASONSPARK_SERVER_PORT)
#
# Every address and port comes from the environment, so the same image serves Docker Compose,
# Kubernetes and (with loopback addresses) a plain machine: tests/test_docker.py runs this file.
set -euo pipefail

role="${1:-driver}"
shift || true
host="${SPARK_HOST:-$(hostname)}"
master_url="${SPARK_MASTER_URL:-spark://spmaster:7077}"
home="${KERASONSPARK_HOME:-/opt/kerasonspark}"
spark_class="$(python -c 'import os, pyspark; print(os.path.join(os.path.dirname(pyspark.__file__), "bin", "spark-class"))')"
export SPARK_LOCAL_HOSTNAME="$host"  # what Spark advertises to the others

start_master() {
    "$spark_class" org.apache.spark.deploy.master.Master --host "$host" \
        --port "${SPARK_MASTER_PORT:-7077}" --webui-port "${SPARK_MASTER_WEBUI_PORT:-8080}"
}

start_worker() {
    "$spark_class" org.apache.spark.deploy.worker.Worker --host "$host" \
        --cores "${SPARK_WORKER_CORES:-1}" --memory "${SPARK_WORKER_MEMORY:-2g}" \
        --webui-port "${SPARK_WORKER_WEBUI_PORT:-8081}" "$master_url"
}

case "$role" in
    master)
        start_master ;;
    worker)
        start_worker ;;
    master-and-worker)
        start_master &
        master=$!
        start_worker &
        worker=$!
        trap 'kill "$master" "$worker" 2>/dev/null' EXIT TERM INT
        wait -n "$master" "$worker" ;;
    driver)
        exec python "$home/examples/mnist.py" --master "$master_url" \
            --conf "spark.driver.host=$host" --conf "spark.driver.bindAddress=${SPARK_BIND_ADDRESS:-$host}" \
            --conf "spark.driver.port=${SPARK_DRIVER_PORT:-7078}" \
            --conf "spark.blockManager.port=${SPARK_BLOCK_MANAGER_PORT:-7079}" \
            --conf "spark.kerasonspark.serverPort=${KERASONSPARK_SERVER_PORT:-7080}" "$@" ;;
    *)
        echo "kerasonspark-entrypoint: unknown role '$role' (master, worker, master-and-worker or driver)" >&2
        exit 2 ;;
esac
