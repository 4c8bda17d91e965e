"""Raw Tianchi files -> processed layout: equal to the generator's processed output."""

from __future__ import annotations

import zipfile

import pytest

import mtl_clippy.data.prepare as prepare_module
from mtl_clippy.data import DataError, generate_dataset, prepare_raw

ROWS = {"train_rows": 3000, "test_rows": 1000, "seed": 5}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    generate_dataset(root / "processed", hard=True, **ROWS)
    generate_dataset(root / "raw", hard=True, raw=True, country="NL", **ROWS)
    return root


def test_raw_files_have_the_raw_layout(generated):
    user = (generated / "raw" / "NL_user_train.csv").read_text().splitlines()
    item = (generated / "raw" / "NL_item_train.csv").read_text().splitlines()
    assert len(user[0].split(",")) == 33 and len(item[0].split(",")) == 49
    assert len(item) == ROWS["train_rows"] and len(user) < len(item)
    assert {line.rsplit(",", 1)[1] for line in item} <= {"0", "1", "2"}


def test_prepared_raw_equals_processed_byte_for_byte(generated, tmp_path):
    summary = prepare_raw(generated / "raw", tmp_path / "out", country="NL", block_size=1 << 16)
    assert summary["train"] == {"rows": ROWS["train_rows"], "dropped": 0}
    for name in ("train.csv", "test.csv"):
        assert (tmp_path / "out" / name).read_bytes() == (
            generated / "processed" / name
        ).read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test.csv", "train.csv"]


def test_zip_input_and_country_detection(generated, tmp_path):
    archive = tmp_path / "aliexpress_NL_datasets.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in (generated / "raw").glob("*.csv"):
            z.write(path, f"NL/{path.name}")
    prepare_raw(archive, tmp_path / "out", progress=False)
    for name in ("train.csv", "test.csv"):
        assert (tmp_path / "out" / name).read_bytes() == (
            generated / "processed" / name
        ).read_bytes()


def test_item_rows_without_a_user_row_are_dropped(generated, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for path in (generated / "raw").glob("*.csv"):
        (raw / path.name).write_bytes(path.read_bytes())
    users = (raw / "NL_user_train.csv").read_text().splitlines()
    missing = users.pop(3).split(",", 1)[0]
    (raw / "NL_user_train.csv").write_text("\n".join(users) + "\n")
    items = (raw / "NL_item_train.csv").read_text().splitlines()
    expected = sum(line.split(",", 1)[0] == missing for line in items)
    summary = prepare_raw(raw, tmp_path / "out", progress=False)
    assert summary["train"]["dropped"] == expected > 0
    assert summary["train"]["rows"] == ROWS["train_rows"] - expected


def test_bad_raw_label_names_file_and_line_and_writes_nothing(generated, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for path in (generated / "raw").glob("*.csv"):
        (raw / path.name).write_bytes(path.read_bytes())
    items = (raw / "NL_item_train.csv").read_text().splitlines()
    items[2500] = items[2500].rsplit(",", 1)[0] + ",3"
    (raw / "NL_item_train.csv").write_text("\n".join(items) + "\n")
    with pytest.raises(DataError) as info:
        prepare_raw(raw, tmp_path / "out", block_size=1 << 16, progress=False)
    assert "NL_item_train.csv" in str(info.value) and info.value.line == 2501
    assert not list((tmp_path / "out").iterdir())


def test_missing_country_is_reported(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(DataError, match="country"):
        prepare_raw(tmp_path / "raw", tmp_path / "out")


def test_command_line(generated, tmp_path, capsys):
    prepare_module.main(
        ["--raw", str(generated / "raw"), "--country", "NL", "--out", str(tmp_path / "o")]
    )
    assert "train: 3000 rows written" in capsys.readouterr().out
    assert (tmp_path / "o" / "train.csv").read_bytes() == (
        generated / "processed" / "train.csv"
    ).read_bytes()
