"""predict stage: batch-predict new rows with the trained model.

Reads  /inputs/train/model.joblib, /inputs/train/model_card.json and /workspace/data/new/rows.csv.
Runs after evaluate (it needs it), so a model that failed evaluate's gate never predicts.
Writes /outputs/predictions.csv: the new rows with a `prediction` column.
"""

import json
import sys
from pathlib import Path

import joblib
import pandas as pd

MODEL = Path("/inputs/train/model.joblib")
CARD = Path("/inputs/train/model_card.json")
ROWS = Path("/workspace/data/new/rows.csv")
OUTPUTS = Path("/outputs")


def main() -> None:
    features = json.loads(CARD.read_text())["features"]
    rows = pd.read_csv(ROWS)
    missing = [f for f in features if f not in rows.columns]
    if missing:
        print(f"predict: {ROWS}: missing feature columns {missing}", file=sys.stderr)
        sys.exit(1)
    model = joblib.load(MODEL)
    rows["prediction"] = model.predict(rows[features]).round(3)
    rows.to_csv(OUTPUTS / "predictions.csv", index=False)
    print(f"predict: {len(rows)} rows -> predictions.csv")


if __name__ == "__main__":
    main()
