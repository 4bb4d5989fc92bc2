import pyarrow as pa
import pytest

from veclip import schema


def test_input_schema_accepts_contract_and_large_types():
    assert schema.input_schema_problems(schema.INPUT_SCHEMA) == []
    large = pa.schema(
        [
            ("key", pa.large_string()),
            ("image", pa.large_binary()),
            ("alt_text", pa.large_string()),
            ("extra", pa.int8()),
        ]
    )
    assert schema.input_schema_problems(large) == []


def test_input_schema_names_each_problem():
    bad = pa.schema([("key", pa.int64()), ("image", pa.string())])
    problems = schema.input_schema_problems(bad)
    assert any("missing required column 'alt_text'" in p and "--columns alt_text=" in p for p in problems)
    assert any("'key' has type int64, expected string" in p for p in problems)
    assert any("'image' has type string, expected binary" in p for p in problems)
    with pytest.raises(schema.SchemaError, match="shard-7"):
        schema.check_input_schema(bad, "shard-7")


def test_column_map_parse_and_apply():
    mapping = schema.ColumnMap.parse("image=jpg, alt_text=caption")
    assert mapping.image == "jpg" and mapping.alt_text == "caption" and mapping.key == "key"
    table = pa.table({"key": ["a"], "jpg": [b"x"], "caption": ["c"], "status": ["ok"]})
    renamed = mapping.apply(table)
    assert renamed.column_names == ["key", "image", "alt_text", "status"]
    assert str(mapping) == "image=jpg,alt_text=caption"
    assert schema.ColumnMap.parse("") == schema.ColumnMap()


@pytest.mark.parametrize(
    "spec, message",
    [("image", "expected role=column"), ("picture=jpg", "unknown role 'picture'"), ("image=", "expected role=column")],
)
def test_column_map_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        schema.ColumnMap.parse(spec)


def test_column_map_refuses_to_clobber_a_column():
    table = pa.table({"key": ["a"], "jpg": [b"x"], "image": [b"y"]})
    with pytest.raises(schema.SchemaError, match="existing column"):
        schema.ColumnMap.parse("image=jpg").apply(table)


def test_enriched_and_quarantine_schemas():
    assert {"vlm_caption", "vecap", "rewrites", "vecap_provenance"} <= set(schema.ENRICHED_SCHEMA.names)
    assert schema.ENRICHED_SCHEMA.field("rewrites").type == pa.list_(pa.string())
    assert schema.ENRICHED_SCHEMA.field("vecap_provenance").type == schema.PROVENANCE
    table = schema.quarantine_table(
        [{"key": "k1", "reason": "image_undecodable", "detail": "junk", "image": b"\x00", "alt_text": "a"}],
        stage="rewrite",
        original_schema=schema.INPUT_SCHEMA,
    )
    row = table.to_pylist()[0]
    assert row["stage"] == "rewrite" and row["reason"] == "image_undecodable" and row["image"] == b"\x00"
    assert table.schema.names[:4] == ["key", "stage", "reason", "detail"]
