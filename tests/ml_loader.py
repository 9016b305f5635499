"""Loads a saved PipelineModel in a new process and SparkSession (none of the test's modules or
registered Keras objects), predicts on a Parquet file and prints the predictions as JSON. The
model's custom objects were saved as pickled code: loading is refused until this process allows
unsafe deserialization, as Keras's own convention asks."""

import json
import sys

from pyspark.ml import PipelineModel

from kerasonspark import start_session

if __name__ == "__main__":
    model_path, data_path = sys.argv[1], sys.argv[2]
    spark = start_session("local[2]", "kerasonspark-ml-loader")
    spark.sparkContext.setLogLevel("ERROR")
    try:
        try:
            PipelineModel.load(model_path)
            refused = ""
        except Exception as exc:
            refused = f"{type(exc).__name__}: {exc}"
        import keras

        keras.config.enable_unsafe_deserialization()
        model = PipelineModel.load(model_path)
        rows = model.transform(spark.read.parquet(data_path)).orderBy("id").collect()
        print(
            json.dumps(
                {
                    "refused": refused,
                    "stats_backend": model.stages[-1].stats.get("backend"),
                    "predictions": [r.prediction for r in rows],
                    "probabilities": [r.probability.toArray().tolist() for r in rows],
                }
            )
        )
    finally:
        spark.stop()
