"""data stage: validate the raw diabetes CSV and split it into train and test sets with a seeded split.

Reads  /workspace/data/raw/diabetes.csv and the params seed, test_size from /pipe/params.json.
Writes /outputs/train.csv and /outputs/test.csv. Bad data is reported in one line on stderr, exit 1.
"""

import json
import sys
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

RAW = Path("/workspace/data/raw/diabetes.csv")
PARAMS = Path("/pipe/params.json")
OUTPUTS = Path("/outputs")
FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
TARGET = "target"
MIN_ROWS = 50


def fail(message: str) -> None:
    print(f"data: {message}", file=sys.stderr)
    sys.exit(1)


def validate(frame: pd.DataFrame) -> None:
    """Exit 1 unless the frame has exactly the expected columns, all numeric, none missing, enough rows."""
    expected = FEATURES + [TARGET]
    if list(frame.columns) != expected:
        fail(f"{RAW}: columns are {list(frame.columns)}, expected {expected}")
    for column in expected:
        if not pd.api.types.is_numeric_dtype(frame[column]):
            bad = frame[column][pd.to_numeric(frame[column], errors="coerce").isna()].iloc[0]
            fail(f"{RAW}: column {column!r} is not numeric (found {bad!r})")
    missing = frame.isna().sum()
    if missing.any():
        fail(f"{RAW}: missing values in {missing[missing > 0].to_dict()}")
    if len(frame) < MIN_ROWS:
        fail(f"{RAW}: {len(frame)} rows, at least {MIN_ROWS} needed")


def main() -> None:
    params = json.loads(PARAMS.read_text())
    try:
        frame = pd.read_csv(RAW)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        fail(f"cannot read {RAW}: {e}")
    validate(frame)
    train, test = train_test_split(frame, test_size=params["test_size"], random_state=params["seed"])
    train.to_csv(OUTPUTS / "train.csv", index=False)
    test.to_csv(OUTPUTS / "test.csv", index=False)
    print(f"data: {len(frame)} rows -> train {len(train)}, test {len(test)} (seed {params['seed']})")


if __name__ == "__main__":
    main()
