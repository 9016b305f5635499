"""Take the docs' screenshot of the live stats page during a real MNIST run.

    python benchmarks/capture_stats_page.py --data ../shared/data/mnist --backend async \\
        --out docs/stats-page.png

Trains the reference CNN on MNIST (2 workers, local Spark, validation on the test images), reads
the stats page's URL from the ``kerasonspark`` log as a user would, and has headless Chromium
(``apt-get install chromium``) load it a given number of seconds into the run.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import threading
import time


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=None)
    parser.add_argument("--backend", default="async")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--after", type=float, default=45.0, help="seconds into training to take the picture"
    )
    parser.add_argument("--out", default="docs/stats-page.png")
    args = parser.parse_args()
    browser = (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )
    if browser is None:
        raise SystemExit("No headless browser found: `apt-get install chromium`.")

    from stats_page import StatsPageWatcher

    from kerasonspark import SparkTrainer, load_mnist, mnist_cnn, start_session
    from kerasonspark._executor import configure_tensorflow

    catcher = StatsPageWatcher()
    logger = logging.getLogger("kerasonspark")
    logger.addHandler(catcher)
    logger.setLevel(logging.INFO)
    configure_tensorflow(0)
    (x, y), test = load_mnist(args.data)
    spark = start_session("local[2]", "kerasonspark-stats-page")
    trainer = SparkTrainer(
        mnist_cnn(), backend=args.backend, num_workers=2, epochs=args.epochs, spark=spark, verbose=0
    )
    training = threading.Thread(
        target=trainer.fit, args=((x, y),), kwargs={"validation_data": test}
    )
    training.start()
    while catcher.url is None and training.is_alive():
        time.sleep(0.2)
    time.sleep(args.after)
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1000,820",
            "--virtual-time-budget=4000",
            f"--screenshot={args.out}",
            catcher.url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    print(f"Saved {args.out} from {catcher.url.split('?')[0]}")
    training.join()
    spark.stop()


if __name__ == "__main__":
    main()
