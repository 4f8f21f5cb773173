from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from qtune import schema


def test_list_array_round_trip_with_nulls():
    values = [np.array([1, 2, 3]), None, np.array([], dtype=np.int64), np.array([7])]
    array = schema.list_array(values, pa.int32())
    assert array.type == pa.list_(pa.int32())
    assert array.to_pylist() == [[1, 2, 3], None, [], [7]]
    offsets, flat = schema.list_offsets_and_values(pa.chunked_array([array[:2], array[2:]]))
    assert offsets.tolist() == [0, 3, 3, 3, 4]
    assert flat.tolist() == [1, 2, 3, 7]


def test_require_columns_names_missing_and_present():
    with pytest.raises(KeyError, match="stage: missing column.s. b; present: a"):
        schema.require_columns(pa.table({"a": [1]}), ["a", "b"], "stage")
