"""The query_filter language and the embedded extractor, on real files (no database needed)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trainingmgr.adapters.base import AdapterError, ExtractionRequest
from trainingmgr.adapters.extraction import EmbeddedExtractor
from trainingmgr.adapters.query_filter import MAX_DEPTH, MAX_FILTER_LENGTH, FilterError, compile_filter
from tests.peers import LOCAL_OUTBOUND

# ================================================================================================ filter language
FRAME = pd.DataFrame(
    {
        "cell": ["c1", "c2", "c3", None, "c'5"],
        "load": [10, 20, 30, 40, 50],
        "rate": [1.5, np.nan, 3.5, 4.5, -2.0],
        "up": [True, False, True, False, True],
        "my col": ["a", "b", "a", "b", "a"],
    }
)
COLUMNS = set(FRAME.columns)


def rows(text: str) -> list[int]:
    mask = compile_filter(text, COLUMNS)(FRAME)
    assert mask.dtype == bool and list(mask.index) == list(FRAME.index)
    return [i for i, keep in enumerate(mask) if keep]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", [0, 1, 2, 3, 4]),
        ("   \n\t", [0, 1, 2, 3, 4]),
        ("cell == 'c1'", [0]),
        ('cell == "c2"', [1]),
        ("cell = 'c1'", [0]),
        ("cell != 'c1'", [1, 2, 4]),  # a missing value satisfies no comparison, not even !=
        ("cell <> 'c1'", [1, 2, 4]),
        ("load < 30", [0, 1]),
        ("load <= 30", [0, 1, 2]),
        ("load > 30", [3, 4]),
        ("load >= 30", [2, 3, 4]),
        ("30 < load", [3, 4]),  # constant on the left
        ("'c1' = cell", [0]),
        ("rate > 2", [2, 3]),
        ("rate < -1", [4]),
        ("rate >= -2.0", [0, 2, 3, 4]),
        ("rate > 1e0", [0, 2, 3]),
        ("rate < .5e1", [0, 2, 3, 4]),
        ("load == +20", [1]),
        ("up == true", [0, 2, 4]),
        ("up = FALSE", [1, 3]),
        ("up == True", [0, 2, 4]),
        ("load > 10 and load < 50", [1, 2, 3]),
        ("load > 10 AND load < 50", [1, 2, 3]),
        ("load = 10 Or load = 50", [0, 4]),
        ("load = 10 OR load = 20 AND up = true", [0]),  # AND binds tighter than OR
        ("(load = 10 OR load = 20) AND up = false", [1]),
        ("NOT load = 10", [1, 2, 3, 4]),
        ("not (load = 10 or load = 20)", [2, 3, 4]),
        ("NOT NOT load = 10", [0]),
        ("cell in ('c1', 'c3')", [0, 2]),
        ("cell IN ('c1','c3',)", [0, 2]),
        ("cell not in ('c1', 'c3')", [1, 4]),
        ("cell NOT IN ('c1')", [1, 2, 4]),
        ("load in (10, 40)", [0, 3]),
        ("cell is null", [3]),
        ("cell IS NOT NULL", [0, 1, 2, 4]),
        ("rate == null", [1]),
        ("rate != NONE", [0, 2, 3, 4]),
        ("cell = 'c''5'", [4]),  # SQL's doubled quote
        ("cell = 'c\\'5'", [4]),  # backslash escape
        ("cell = \"c'5\"", [4]),
        ("`my col` = 'b'", [1, 3]),
        ("`load` > 40", [4]),
        ("((((load > 10))))", [1, 2, 3, 4]),
        ("cell == 'DROP TABLE x; --'", []),  # only text: it is compared, never run
        ("cell == '__import__(\"os\")'", []),
    ],
)
def test_valid_filters(text: str, expected: list[int]) -> None:
    assert rows(text) == expected


def test_compiled_filter_names_its_columns() -> None:
    f = compile_filter("cell = 'x' or (load > 1 and not `my col` in ('a'))", COLUMNS)
    assert f.columns == {"cell", "load", "my col"}
    assert compile_filter("", COLUMNS).columns == frozenset()


def test_null_filter_means_no_filter() -> None:
    assert compile_filter(None, COLUMNS)(FRAME).all()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text, message",
    [
        # injection attempts and Python constructs
        ("__import__('os')", "function calls are not allowed"),
        ("__import__('os').system('id')", "function calls are not allowed"),
        ("load.__class__", "attribute access is not allowed"),
        ("load.__class__.__bases__ == 1", "attribute access is not allowed"),
        ("__class__ == 1", "names starting with '__'"),
        ("`__dict__` == 1", "names starting with '__'"),
        ("1; drop table x", "only one expression"),
        ("load = 1; DROP TABLE users", "only one expression"),
        ("load = 1 -- comment", "comments are not allowed"),
        ("load = 1 # comment", "comments are not allowed"),
        ("abs(load) > 1", "function calls are not allowed"),
        ("len(cell) > 1", "function calls are not allowed"),
        ("eval('1') == 1", "function calls are not allowed"),
        ("cell[0] == 'c'", "subscripts are not allowed"),
        ("load + 1 > 2", "arithmetic is not allowed"),
        ("load - 1 > 2", "arithmetic is not allowed"),
        ("load * 2 > 2", "arithmetic is not allowed"),
        ("load / 2 > 2", "arithmetic is not allowed"),
        ("load % 2 == 0", "arithmetic is not allowed"),
        ("load ** 2 > 2", "arithmetic is not allowed"),
        ("load > 2 - 1", "arithmetic is not allowed"),
        ("lambda: 1", "lambdas"),
        ("lambda == 1", "lambdas are not allowed"),
        ("load == @x", "no variables"),
        ("{'a': 1} == load", "'{' is not allowed"),
        ("load & 1", "use AND"),
        ("load = 1 && load = 2", "use AND"),
        ("load = 1 || load = 2", "use OR"),
        ("~(load = 1)", "use NOT"),
        ("!(load = 1)", "use NOT"),
        ("load == 1 == 1", "chained comparisons"),
        ("1 < load < 3", "chained comparisons"),
        ("load < rate", "comparing two columns"),
        ("'a' == 'a'", "expected a column name"),
        ("1 == 1", "expected a column name"),
        ("true", "expected a comparison operator"),
        ("load", "expected a comparison operator"),
        ("load > 1 and", "expected a comparison"),
        ("load >", "expected a constant"),
        ("(load > 1", "expected ')'"),
        ("load > 1)", "expected AND, OR or the end"),
        ("load > 1 load < 2", "expected AND, OR or the end"),
        ("cell = 'abc", "unterminated string"),
        ("cell = 'a\\x'", "unknown escape"),
        ("`cell = 1", "unterminated `column name`"),
        ("load = 1x", "malformed number"),
        ("load = 1.2.3", "malformed number"),
        ("load in ()", "expected a constant"),
        ("load in 1, 2", "'(' after IN"),
        ("load in (1 2)", "',' or ')'"),
        ("load in (1, null)", "NULL is not allowed in an IN list"),
        ("load not = 1", "IN after NOT"),
        ("cell is 'x'", "NULL after IS"),
        ("load < null", "NULL can only be tested"),
        ("load = \x00", "unexpected character"),
        # unknown columns, with a hint
        ("loads > 1", "unknown column 'loads' (did you mean 'load'?)"),
        ("nope = 1 or other = 2", "unknown columns 'nope', 'other'"),
        ("`Load` = 1", "unknown column 'Load'"),  # names are case-sensitive
    ],
)
def test_refused_filters(text: str, message: str) -> None:
    with pytest.raises(FilterError) as caught:
        compile_filter(text, COLUMNS)
    assert message in str(caught.value)


def test_filter_error_is_a_value_error() -> None:
    assert issubclass(FilterError, ValueError)


def test_length_limit() -> None:
    text = " or ".join(["load = 1"] * 600)
    assert len(text) > MAX_FILTER_LENGTH
    with pytest.raises(FilterError, match="longer than"):
        compile_filter(text, COLUMNS)
    long_but_flat = " or ".join(["load = 10"] * 300)  # within the limit: fine, and no recursion issue
    assert rows(long_but_flat) == [0]


def test_depth_limit() -> None:
    ok = "(" * MAX_DEPTH + "load = 10" + ")" * MAX_DEPTH
    assert rows(ok) == [0]
    with pytest.raises(FilterError, match="nested more than"):
        compile_filter("(" * (MAX_DEPTH + 1) + "load = 10" + ")" * (MAX_DEPTH + 1), COLUMNS)
    with pytest.raises(FilterError, match="nested more than"):
        compile_filter("not " * (MAX_DEPTH + 1) + "load = 10", COLUMNS)
    with pytest.raises(FilterError):  # far beyond: still a FilterError, never a RecursionError
        compile_filter("(" * 2000, COLUMNS)


@pytest.mark.parametrize(
    "text, message",
    [
        ("load == 'ten'", "column 'load' holds numbers"),
        ("load > '5'", "column 'load' holds numbers"),
        ("cell == 1", "column 'cell' holds text"),
        ("up == 1", "column 'up' holds TRUE/FALSE values"),
        ("load == true", "column 'load' holds numbers"),
        ("cell in ('c1', 2)", "column 'cell' holds text"),
    ],
)
def test_type_mismatch_is_reported_when_applied(text: str, message: str) -> None:
    f = compile_filter(text, COLUMNS)  # the types are only known once there is data
    with pytest.raises(FilterError, match=message):
        f(FRAME)


def test_dates_compare_with_text() -> None:
    frame = pd.DataFrame({"t": pd.to_datetime(["2024-01-01", "2024-02-01", "2024-03-01"])})
    f = compile_filter("t >= '2024-02-01'", {"t"})
    assert f(frame).tolist() == [False, True, True]


def test_mixed_object_column_errors_clearly() -> None:
    frame = pd.DataFrame({"m": pd.Series([1, "a", 2.5], dtype=object)})
    with pytest.raises(FilterError, match="cannot compare column 'm'"):
        compile_filter("m < 'b'", {"m"})(frame)


# ================================================================================================ extractor
@pytest.fixture
def roots(tmp_path: Path) -> list[Path]:
    first, second = tmp_path / "src1", tmp_path / "src2"
    first.mkdir()
    second.mkdir()
    return [first, second]


@pytest.fixture
def extractor(roots: list[Path], tmp_path: Path) -> EmbeddedExtractor:
    return EmbeddedExtractor(roots, tmp_path / "data" / "datasets", outbound=LOCAL_OUTBOUND)


SAMPLE = pd.DataFrame(
    {
        "cellid": ["c1", "c2", "c1", "c3", "c2", "c1"],
        "pdcpBytesDl": [100, 200, 300, 400, 500, 600],
        "pdcpBytesUl": [10.5, 20.5, 30.5, 40.5, 50.5, 60.5],
        "hour": [0, 1, 2, 3, 4, 5],
    }
)


def request(
    measurement: str,
    *,
    source: str = "CsvSource",
    features: tuple[str, ...] = ("pdcpBytesDl", "pdcpBytesUl"),
    query_filter: str = "",
    featurepath: str = "fg_1",
) -> ExtractionRequest:
    return ExtractionRequest(
        trainingjob_id=1,
        featurepath=featurepath,
        datalake_source=source,
        feature_list=list(features),
        query_filter=query_filter,
        source={"measurement": measurement, "host": "", "port": "", "bucket": "", "db_org": "", "token": ""},
    )


def bad_input(extractor: EmbeddedExtractor, req: ExtractionRequest, message: str) -> AdapterError:
    with pytest.raises(AdapterError) as caught:
        extractor.start(req)
    assert caught.value.retryable is False
    assert message in str(caught.value)
    return caught.value


def test_csv_extraction_keeps_features_and_filters(extractor: EmbeddedExtractor, roots: list[Path]) -> None:
    SAMPLE.to_csv(roots[0] / "cells.csv", index=False)
    status = extractor.start(request("cells.csv", query_filter="cellid = 'c1' AND hour >= 2"))
    assert status.state == "COMPLETED" and status.rows == 2
    uri = Path(status.dataset_uri or "")
    assert uri.is_absolute() and uri == extractor.dataset_dir.resolve() / "fg_1.csv"
    assert uri.read_text().splitlines() == ["pdcpBytesDl,pdcpBytesUl", "300,30.5", "600,60.5"]
    assert [p.name for p in uri.parent.iterdir()] == ["fg_1.csv"]  # no temporary file left behind


def test_csv_without_filter_keeps_every_row_in_feature_order(extractor: EmbeddedExtractor, roots: list[Path]) -> None:
    SAMPLE.to_csv(roots[0] / "cells.csv", index=False)
    status = extractor.start(request("cells.csv", features=("hour", "cellid")))
    written = pd.read_csv(status.dataset_uri)
    assert list(written.columns) == ["hour", "cellid"]
    pd.testing.assert_frame_equal(written, SAMPLE[["hour", "cellid"]], check_dtype=False)


def test_csv_is_read_in_chunks(roots: list[Path], tmp_path: Path) -> None:
    big = pd.DataFrame({"k": np.arange(1000), "v": np.arange(1000) * 2, "tag": ["a", "b"] * 500})
    big.to_csv(roots[0] / "big.csv", index=False)
    small_chunks = EmbeddedExtractor(roots, tmp_path / "ds", chunk_rows=7, outbound=LOCAL_OUTBOUND)
    # The first chunks keep nothing: the header must still appear exactly once.
    status = small_chunks.start(request("big.csv", features=("k", "v"), query_filter="k >= 500 and tag = 'b'"))
    assert status.rows == 250
    written = pd.read_csv(status.dataset_uri)
    assert list(written.columns) == ["k", "v"]
    assert written["k"].tolist() == list(range(501, 1000, 2))


def test_parquet_extraction(extractor: EmbeddedExtractor, roots: list[Path]) -> None:
    SAMPLE.to_parquet(roots[1] / "cells.parquet", index=False)
    status = extractor.start(
        request("cells.parquet", source="ParquetSource", features=("cellid", "pdcpBytesDl"), query_filter="hour in (1, 4) or pdcpBytesUl > 60")
    )
    assert status.rows == 3
    assert Path(status.dataset_uri or "").read_text().splitlines() == [
        "cellid,pdcpBytesDl",
        "c2,200",
        "c2,500",
        "c1,600",
    ]


def test_parquet_read_in_batches(roots: list[Path], tmp_path: Path) -> None:
    pd.DataFrame({"a": np.arange(100), "b": np.arange(100) % 3}).to_parquet(roots[0] / "p.parquet")
    status = EmbeddedExtractor(roots, tmp_path / "ds", chunk_rows=9, outbound=LOCAL_OUTBOUND).start(
        request("p.parquet", source="ParquetSource", features=("a",), query_filter="b = 0")
    )
    assert status.rows == 34
    assert pd.read_csv(status.dataset_uri)["a"].tolist() == list(range(0, 100, 3))


def test_first_root_wins_and_second_root_is_searched(extractor: EmbeddedExtractor, roots: list[Path]) -> None:
    SAMPLE.to_csv(roots[0] / "both.csv", index=False)
    SAMPLE.head(2).to_csv(roots[1] / "both.csv", index=False)
    SAMPLE.head(3).to_csv(roots[1] / "second.csv", index=False)
    assert extractor.start(request("both.csv")).rows == 6
    assert extractor.start(request("second.csv", featurepath="fg_2")).rows == 3


def test_subfolders_and_absolute_paths_inside_a_root(extractor: EmbeddedExtractor, roots: list[Path]) -> None:
    (roots[1] / "sub").mkdir()
    SAMPLE.to_csv(roots[1] / "sub" / "cells.csv", index=False)
    assert extractor.start(request("sub/cells.csv")).rows == 6
    assert extractor.start(request(str(roots[1] / "sub" / "cells.csv"), featurepath="fg_2")).rows == 6


def test_symlink_inside_the_root_is_fine(extractor: EmbeddedExtractor, roots: list[Path]) -> None:
    SAMPLE.to_csv(roots[0] / "real.csv", index=False)
    (roots[0] / "alias.csv").symlink_to(roots[0] / "real.csv")
    assert extractor.start(request("alias.csv")).rows == 6


@pytest.mark.parametrize("measurement", ["../outside.csv", "sub/../../outside.csv", "..", "./../outside.csv"])
def test_dot_dot_is_refused(extractor: EmbeddedExtractor, roots: list[Path], measurement: str) -> None:
    SAMPLE.to_csv(roots[0].parent / "outside.csv", index=False)
    (roots[0] / "sub").mkdir()
    bad_input(extractor, request(measurement), "must not contain '..'")


def test_absolute_path_outside_the_roots_is_refused(extractor: EmbeddedExtractor, roots: list[Path]) -> None:
    outside = roots[0].parent / "outside.csv"
    SAMPLE.to_csv(outside, index=False)
    bad_input(extractor, request(str(outside)), "is not inside the source folders")
    bad_input(extractor, request("/etc/passwd"), "is not inside the source folders")
    bad_input(extractor, request(str(roots[0]) + "/../outside.csv"), "must not contain '..'")


def test_symlink_leaving_the_root_is_refused(extractor: EmbeddedExtractor, roots: list[Path]) -> None:
    outside = roots[0].parent / "secret.csv"
    SAMPLE.to_csv(outside, index=False)
    (roots[0] / "link.csv").symlink_to(outside)
    bad_input(extractor, request("link.csv"), "leads outside the source folders")
    # ... also through a symlinked folder
    (roots[0] / "dir").symlink_to(roots[0].parent)
    bad_input(extractor, request("dir/secret.csv"), "leads outside the source folders")


def test_not_a_regular_file_is_refused(extractor: EmbeddedExtractor, roots: list[Path]) -> None:
    (roots[0] / "folder.csv").mkdir()
    bad_input(extractor, request("folder.csv"), "is not a regular file")
    os.mkfifo(roots[0] / "pipe.csv")  # opening a FIFO would block the worker: it must never be opened
    bad_input(extractor, request("pipe.csv"), "is not a regular file")


def test_missing_and_empty_names(extractor: EmbeddedExtractor) -> None:
    bad_input(extractor, request("nothing.csv"), "not found in the source folders")
    bad_input(extractor, request(""), "measurement (the source file) is empty")
    bad_input(extractor, request("a\x00b.csv"), "NUL")


def test_missing_features_are_named(extractor: EmbeddedExtractor, roots: list[Path]) -> None:
    SAMPLE.to_csv(roots[0] / "cells.csv", index=False)
    error = bad_input(extractor, request("cells.csv", features=("pdcpBytesDl", "rsrp", "sinr")), "feature(s) not in")
    assert "rsrp, sinr" in str(error) and "pdcpBytesDl" not in str(error).split(":")[-1]


def test_empty_feature_list(extractor: EmbeddedExtractor, roots: list[Path]) -> None:
    SAMPLE.to_csv(roots[0] / "cells.csv", index=False)
    bad_input(extractor, request("cells.csv", features=()), "feature list is empty")


def test_bad_filters_are_bad_input(extractor: EmbeddedExtractor, roots: list[Path]) -> None:
    SAMPLE.to_csv(roots[0] / "cells.csv", index=False)
    bad_input(extractor, request("cells.csv", query_filter="__import__('os')"), "query_filter: function calls")
    bad_input(extractor, request("cells.csv", query_filter="nope = 1"), "query_filter: unknown column 'nope'")
    bad_input(extractor, request("cells.csv", query_filter="cellid = 5"), "query_filter: column 'cellid' holds text")
    assert not extractor.dataset_dir.exists() or not any(extractor.dataset_dir.iterdir())


def test_filter_leaving_no_rows(extractor: EmbeddedExtractor, roots: list[Path]) -> None:
    SAMPLE.to_csv(roots[0] / "cells.csv", index=False)
    bad_input(extractor, request("cells.csv", query_filter="hour > 100"), "the filter left no rows")
    assert extractor.status(request("cells.csv")).state == "FAILED"
    assert not any(extractor.dataset_dir.iterdir())  # neither dataset nor temporary file


def test_source_without_rows(extractor: EmbeddedExtractor, roots: list[Path]) -> None:
    SAMPLE.head(0).to_csv(roots[0] / "header_only.csv", index=False)
    bad_input(extractor, request("header_only.csv"), "has no rows")
    (roots[0] / "empty.csv").write_text("")
    bad_input(extractor, request("empty.csv"), "is empty")


def test_unreadable_files_are_bad_input(extractor: EmbeddedExtractor, roots: list[Path]) -> None:
    (roots[0] / "fake.parquet").write_text("not parquet at all")
    bad_input(extractor, request("fake.parquet", source="ParquetSource"), "cannot be read")
    (roots[0] / "binary.csv").write_bytes(b"pdcpBytesDl,pdcpBytesUl\n\xff\xfe\xfa,1\n")
    bad_input(extractor, request("binary.csv"), "not UTF-8")


def test_influx_and_unknown_sources(extractor: EmbeddedExtractor) -> None:
    # InfluxSource is read from InfluxDB (tests/test_influx_source.py); without a host it is bad input.
    error = bad_input(extractor, request("m", source="InfluxSource"), "InfluxDB host is empty")
    assert error.retryable is False
    bad_input(extractor, request("m", source="KafkaSource"), "unknown datalake source 'KafkaSource'")


@pytest.mark.parametrize("featurepath", ["", "../x", "a/b", "a.b", "a-b", "fg 1", "x\x00", "é"])
def test_featurepath_is_validated(extractor: EmbeddedExtractor, roots: list[Path], featurepath: str) -> None:
    SAMPLE.to_csv(roots[0] / "cells.csv", index=False)
    bad_input(extractor, request("cells.csv", featurepath=featurepath), "invalid featurepath")
    with pytest.raises(AdapterError, match="invalid featurepath"):
        extractor.status(request("cells.csv", featurepath=featurepath))
    with pytest.raises(AdapterError, match="invalid featurepath"):
        extractor.remove(featurepath)


def test_status_and_remove(extractor: EmbeddedExtractor, roots: list[Path]) -> None:
    SAMPLE.to_csv(roots[0] / "cells.csv", index=False)
    req = request("cells.csv")
    missing = extractor.status(req)
    assert missing.state == "FAILED" and missing.error == "no dataset"
    done = extractor.start(req)
    status = extractor.status(req)
    assert status.state == "COMPLETED" and status.dataset_uri == done.dataset_uri
    (extractor.dataset_dir / ".fg_1.dead.tmp").write_text("left by a crashed worker")
    extractor.remove("fg_1")
    assert not any(extractor.dataset_dir.iterdir())
    assert extractor.status(req).state == "FAILED"
    extractor.remove("fg_1")  # twice is fine


def test_rerun_replaces_the_dataset(extractor: EmbeddedExtractor, roots: list[Path]) -> None:
    SAMPLE.to_csv(roots[0] / "cells.csv", index=False)
    assert extractor.start(request("cells.csv")).rows == 6
    assert extractor.start(request("cells.csv", query_filter="cellid = 'c2'")).rows == 2
    assert len(pd.read_csv(extractor.dataset_path("fg_1"))) == 2


def test_write_failure_is_retryable(extractor: EmbeddedExtractor, roots: list[Path]) -> None:
    SAMPLE.to_csv(roots[0] / "cells.csv", index=False)
    extractor.dataset_dir.parent.mkdir(parents=True)
    extractor.dataset_dir.write_text("a file where the folder should be")
    with pytest.raises(AdapterError) as caught:
        extractor.start(request("cells.csv"))
    assert caught.value.retryable is True
