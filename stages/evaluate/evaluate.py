"""evaluate stage: score the trained model on the test split.

Reads  /inputs/train/model.joblib and /inputs/data/test.csv.
Writes /outputs/metrics.json (flat numbers: r2, mae, rmse, n_test) and /outputs/pred_vs_actual.png.
"""

import json
import math
from pathlib import Path

import joblib
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen
import pandas as pd
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

MODEL = Path("/inputs/train/model.joblib")
TEST = Path("/inputs/data/test.csv")
OUTPUTS = Path("/outputs")
TARGET = "target"


def plot(actual: pd.Series, predicted: pd.Series, r2: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.scatter(actual, predicted, s=14, alpha=0.7)
    low, high = min(actual.min(), predicted.min()), max(actual.max(), predicted.max())
    ax.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("actual disease progression")
    ax.set_ylabel("predicted")
    ax.set_title(f"test set, r2 = {r2:.3f}")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def main() -> None:
    model = joblib.load(MODEL)
    test = pd.read_csv(TEST)
    actual = test[TARGET]
    predicted = pd.Series(model.predict(test.drop(columns=[TARGET])), index=test.index)
    metrics = {
        "r2": round(float(r2_score(actual, predicted)), 6),
        "mae": round(float(mean_absolute_error(actual, predicted)), 6),
        "rmse": round(math.sqrt(mean_squared_error(actual, predicted)), 6),
        "n_test": len(test),
    }
    (OUTPUTS / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot(actual, predicted, metrics["r2"], OUTPUTS / "pred_vs_actual.png")
    print("evaluate: " + ", ".join(f"{k} {v}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
