"""train stage: fit the regression model named in params and save it with a model card.

Reads  /inputs/data/train.csv and the params model, n_estimators, max_depth, learning_rate, alpha, seed.
Writes /outputs/model.joblib and /outputs/model_card.json. The card has no timestamp, so the same data and
params give byte-identical outputs.
"""

import hashlib
import json
import platform
import sys
from pathlib import Path
from typing import Any

import joblib
import numpy
import pandas as pd
import sklearn
from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

TRAIN = Path("/inputs/data/train.csv")
PARAMS = Path("/pipe/params.json")
OUTPUTS = Path("/outputs")
TARGET = "target"


def build_model(params: dict[str, Any]) -> Any:
    name = params.get("model", "gradient_boosting")
    seed = params.get("seed", 42)
    if name == "gradient_boosting":
        return GradientBoostingRegressor(
            n_estimators=params.get("n_estimators", 100),
            max_depth=params.get("max_depth", 3),
            learning_rate=params.get("learning_rate", 0.1),
            random_state=seed,
        )
    if name == "random_forest":
        return RandomForestRegressor(
            n_estimators=params.get("n_estimators", 100),
            max_depth=params.get("max_depth"),
            random_state=seed,
            n_jobs=1,
        )
    if name == "ridge":
        return make_pipeline(StandardScaler(), Ridge(alpha=params.get("alpha", 1.0)))
    print(f"train: unknown model {name!r}: use gradient_boosting, random_forest or ridge", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    params = json.loads(PARAMS.read_text())
    frame = pd.read_csv(TRAIN)
    features = [c for c in frame.columns if c != TARGET]
    model = build_model(params)
    model.fit(frame[features], frame[TARGET])
    joblib.dump(model, OUTPUTS / "model.joblib")
    card = {
        "model": params.get("model", "gradient_boosting"),
        "estimator": type(model).__name__,
        "params": params,
        "features": features,
        "target": TARGET,
        "train_rows": len(frame),
        "train_sha256": hashlib.sha256(TRAIN.read_bytes()).hexdigest(),
        "versions": {
            "python": platform.python_version(),
            "scikit-learn": sklearn.__version__,
            "numpy": numpy.__version__,
            "pandas": pd.__version__,
            "joblib": joblib.__version__,
        },
    }
    (OUTPUTS / "model_card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    print(f"train: {card['model']} fitted on {len(frame)} rows")


if __name__ == "__main__":
    main()
