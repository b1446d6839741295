"""Loads items.jsonl beside this file as the task's only split: nothing is fetched from a hub."""
import json
import os

ITEMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "items.jsonl")


def load_items(**_):
    """{"test": Dataset} of the question / choices / answer items (lm_eval's `custom_dataset` hook)."""
    import datasets

    with open(ITEMS, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
