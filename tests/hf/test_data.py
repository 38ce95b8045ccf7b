"""add_example_ids / num_example_ids / dataset_fingerprint_metadata on in-memory datasets (no downloads)."""

from __future__ import annotations

import datasets
import pytest
import torch

from hf_integration import DataWeights, add_example_ids, dataset_fingerprint_metadata, num_example_ids


@pytest.fixture
def dataset() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(20)], "label": [i % 3 for i in range(20)]})


def test_ids_survive_shuffle_and_filter(dataset):
    ds = add_example_ids(dataset)
    assert ds["example_id"][:] == list(range(20))
    assert ds.features["example_id"].dtype == "int64"

    processed = ds.filter(lambda r: r["label"] != 1).shuffle(seed=0)
    assert len(processed) < 20
    for row in processed:
        assert row["text"] == f"row {row['example_id']}"  # the id still names the original example
    assert sorted(processed["example_id"][:]) == [i for i in range(20) if i % 3 != 1]
    assert num_example_ids(processed) == 19  # max id + 1 (id 19 has label 1 and was dropped)

    # Re-adding after processing keeps the original ids (dataset returned unchanged).
    again = add_example_ids(processed)
    assert again is processed


def test_ids_feed_data_weights_through_a_torch_batch(dataset):
    ds = add_example_ids(dataset).shuffle(seed=1).with_format("torch", columns=["example_id"])
    batch = ds[:4]
    assert batch["example_id"].dtype == torch.int64
    dw = DataWeights(num_example_ids(ds))
    dw(torch.rand(4), batch, {})


def test_custom_column_and_dataset_dict(dataset):
    dd = datasets.DatasetDict({"train": dataset, "test": dataset.select(range(5))})
    out = add_example_ids(dd, column="idx")
    assert out["train"]["idx"][:] == list(range(20))
    assert out["test"]["idx"][:] == list(range(5))


@pytest.mark.parametrize(
    "values, error, match",
    [
        ([0, 1, 1] + list(range(3, 20)), ValueError, "not unique"),
        ([float(i) for i in range(20)], TypeError, "not an integer type"),
        ([str(i) for i in range(20)], TypeError, "not an integer type"),
        ([-1] + list(range(1, 20)), ValueError, "negative"),
        ([None] + list(range(1, 20)), ValueError, "null"),
    ],
)
def test_bad_existing_column(dataset, values, error, match):
    bad = dataset.add_column("example_id", values)
    with pytest.raises(error, match=match):
        add_example_ids(bad)


def test_not_a_dataset():
    with pytest.raises(TypeError, match="map-style"):
        add_example_ids([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="add_example_ids"):
        num_example_ids(datasets.Dataset.from_dict({"x": [1]}))


def test_fingerprint_metadata(dataset):
    ds = add_example_ids(dataset)
    meta = dataset_fingerprint_metadata(ds, dataset_name="org/data", split="train")
    assert meta == {"fingerprint": ds._fingerprint, "num_rows": "20", "id_column": "example_id",
                    "dataset_name": "org/data", "split": "train"}
    assert all(isinstance(v, str) for v in meta.values())
    assert set(dataset_fingerprint_metadata(ds)) == {"fingerprint", "num_rows", "id_column"}
    # Deterministic for the same data and processing, changed by processing.
    same = add_example_ids(datasets.Dataset.from_dict(dataset.to_dict()))
    assert dataset_fingerprint_metadata(same)["fingerprint"] == meta["fingerprint"]
    assert dataset_fingerprint_metadata(ds.shuffle(seed=0))["fingerprint"] != meta["fingerprint"]


def test_fingerprint_metadata_as_expected_on_load(tmp_path, dataset):
    ds = add_example_ids(dataset)
    dw = DataWeights(num_example_ids(ds))
    dw.save_pretrained(str(tmp_path), metadata={"method": "cg", **dataset_fingerprint_metadata(ds, split="train")})
    DataWeights.from_pretrained(str(tmp_path), expected=dataset_fingerprint_metadata(ds, split="train"))
    other = add_example_ids(dataset.select(range(10)))
    with pytest.raises(ValueError, match="was saved as"):
        DataWeights.from_pretrained(str(tmp_path), expected=dataset_fingerprint_metadata(other, split="train"))
