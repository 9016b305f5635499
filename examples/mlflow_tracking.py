"""Train the reference CNN with ``sync`` and log the run to MLflow, then score the test set with
the logged model through ``mlflow.pyfunc.spark_udf``.

    pip install "kerasonspark[mlflow]"
    python examples/mlflow_tracking.py --tracking-uri sqlite:///mlflow.db --limit 6000
    python examples/mlflow_tracking.py --tracking-uri http://127.0.0.1:5000   # an mlflow server

Prints the run id, the epochs' metrics as MLflow holds them (at the global step) and how many test
predictions of the served model agree with the returned model's.
"""

import argparse

import mlflow
import numpy as np

from kerasonspark import (
    MlflowConfig,
    SparkTrainer,
    load_mnist,
    mnist_cnn,
    numpy_to_dataframe,
    start_session,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--data", default=None, help="folder with the MNIST files")
    parser.add_argument("--limit", type=int, default=0, help="train on the first N rows only")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    mlflow.set_tracking_uri(args.tracking_uri)
    spark = start_session("local[2]", "kerasonspark-mlflow-example")
    (x, y), (tx, ty) = load_mnist(args.data)
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    trainer = SparkTrainer(
        mnist_cnn(), backend="sync", epochs=args.epochs, spark=spark, tracking=MlflowConfig()
    )
    trainer.fit(x, y, validation_data=(tx[:2000], ty[:2000]))
    run = mlflow.last_active_run()
    assert run is not None
    client = mlflow.MlflowClient()
    print("run", run.info.run_id)
    for key in ("loss", "val_accuracy"):
        points = client.get_metric_history(run.info.run_id, key)
        print(key, [(m.step, round(m.value, 4)) for m in sorted(points, key=lambda m: m.step)])
    serve = mlflow.pyfunc.spark_udf(
        spark, f"runs:/{run.info.run_id}/model", result_type="array<float>", env_manager="local"
    )
    test_df = numpy_to_dataframe(spark, tx[:1000], ty[:1000])
    served = np.array([r.p for r in test_df.select(serve("features").alias("p")).collect()])
    returned = trainer.model.predict(tx[:1000], verbose=0)
    agree = int((served.argmax(1) == returned.argmax(1)).sum())
    print(f"served model agrees with the returned model on {agree}/1000 test rows")
    spark.stop()


if __name__ == "__main__":
    main()
