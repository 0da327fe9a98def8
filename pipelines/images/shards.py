"""The Parquet shard contract (docs/ARCHITECTURE.md §1) and checks on a shard location before Ray starts."""

from __future__ import annotations

import functools
import json
import os
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.images.decode import IMAGE_EXTENSIONS, header_size, image_bytes

SHARD_SCHEMA = pa.schema(
    [
        pa.field("image", pa.binary(), nullable=True),
        pa.field("label", pa.int64(), nullable=True),
        pa.field("id", pa.string(), nullable=False),
    ]
)
EXPECTED_SCHEMA_TEXT = (
    "Parquet with column image: binary (encoded bytes) or struct<bytes: binary, path: string>, "
    "optional label: int64, optional id: string"
)
CLASSES_FILE = "classes.json"


class DataError(ValueError):
    """Bad input data or location; the message is one line naming what and where."""


@dataclass(frozen=True)
class ShardSet:
    """Parquet files found under a location, with the filesystem that reads them."""

    filesystem: pafs.FileSystem
    root: str
    files: list[str]
    has_label: bool
    has_id: bool

    @functools.cached_property
    def num_rows(self) -> int:
        """Rows over all shards, from every file's footer, each checked on the way (see
        `check_footers`); read only when asked, in parallel (remote footers cost a round trip each)."""
        return check_footers(self)


# Footers read at once: a cloud folder of thousands of shards is bound by round trips, not bytes.
FOOTER_THREADS = 32
_SCHEMA_COLUMNS = ("image", "label", "id")


def check_footers(shards: ShardSet) -> int:
    """Reads every shard's footer and returns the total rows. Refuses, naming the file, a file
    that is not readable Parquet (truncated, or another format under a .parquet name) and a file
    whose `image`/`label`/`id` columns differ from the first file's; refuses a set with no rows.

    Raises:
        DataError: one line naming the first bad file (in sorted order) and what is wrong.
    """
    from concurrent.futures import ThreadPoolExecutor

    def footer(path: str) -> tuple[int, pa.Schema | None, str]:
        try:
            metadata = pq.ParquetFile(path, filesystem=shards.filesystem).metadata
            return metadata.num_rows, metadata.schema.to_arrow_schema(), ""
        except (pa.ArrowInvalid, OSError) as error:
            return 0, None, f"not a readable Parquet file ({str(error).splitlines()[0]})"

    with ThreadPoolExecutor(max_workers=min(FOOTER_THREADS, len(shards.files))) as pool:
        footers = list(pool.map(footer, shards.files))
    reference = next((schema for _, schema, _ in footers if schema is not None), None)
    for path, (_, schema, problem) in zip(shards.files, footers):
        if problem:
            raise DataError(f"{path}: {problem}")
        for column in _SCHEMA_COLUMNS:
            ours = schema.field(column).type if column in schema.names else None
            theirs = reference.field(column).type if column in reference.names else None
            if ours != theirs:
                raise DataError(f"{path}: column '{column}' is {ours or 'missing'} but {shards.files[0]} has "
                                f"{theirs or 'none'} (every shard of a set must have the same schema)")
    total = sum(rows for rows, _, _ in footers)
    if total == 0:
        raise DataError(f"{shards.root}: the shards hold no rows")
    return total


def absolute_location(location: str) -> str:
    """A local path made absolute (processes that Ray starts, such as Tune trials, run in other
    folders); a URI as it is."""
    return location if not location or "://" in location else os.path.abspath(location)


def resolve_location(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or any URI pyarrow handles (s3://, gs://, ...)."""
    try:
        return pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, ValueError):
        return pafs.LocalFileSystem(), location


def parquet_files(location: str) -> tuple[pafs.FileSystem, list[str]]:
    """(filesystem, the Parquet files at `location`): the file itself, or every `.parquet` file under
    the folder, sorted; none when nothing is there."""
    filesystem, root = resolve_location(location)
    kind = filesystem.get_file_info(root).type
    if kind == pafs.FileType.File:
        return filesystem, [root]
    if kind == pafs.FileType.NotFound:
        return filesystem, []
    entries = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    return filesystem, sorted(e.path for e in entries if e.type == pafs.FileType.File and e.path.endswith(".parquet"))


def is_image_column(field: pa.Field) -> bool:
    """Whether a candidate `image` column holds encoded bytes: binary, or Hugging Face's
    `struct<bytes, path>` (the decoder reads either)."""
    kind = field.type
    return (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
            or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0))


def find_shards(location: str) -> ShardSet:
    """List the Parquet shards under `location` (folder, file or any URI pyarrow handles) and
    check the first one carries an `image` column.

    Raises:
        DataError: missing path, no Parquet files, unreadable file or a wrong schema.
    """
    filesystem, root = resolve_location(location)
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{location}: no such file or folder (expected {EXPECTED_SCHEMA_TEXT})")
    if info.type == pafs.FileType.File:
        files = [root]
    else:
        entries = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
        files = sorted(
            e.path for e in entries if e.type == pafs.FileType.File and e.path.endswith(".parquet")
        )
    if not files and info.type != pafs.FileType.File and any(
            posixpath.splitext(e.path)[1].lower() in IMAGE_EXTENSIONS for e in entries):
        raise DataError(f"{location}: holds image files, not Parquet shards: write shards with `selfsup prepare "
                        f"{location} --out SHARDS` (--test-fraction 0.2 for a labeled test split), then give SHARDS")
    if not files:
        raise DataError(f"{location}: no .parquet files found (expected {EXPECTED_SCHEMA_TEXT})")
    try:
        schema = pq.read_schema(files[0], filesystem=filesystem)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"{files[0]}: not a readable Parquet file ({error})") from None
    if "image" not in schema.names:
        raise DataError(
            f"{files[0]}: no 'image' column (found {', '.join(schema.names)}; expected {EXPECTED_SCHEMA_TEXT})"
        )
    if not is_image_column(schema.field("image")):
        raise DataError(
            f"{files[0]}: column 'image' is {schema.field('image').type} (expected {EXPECTED_SCHEMA_TEXT})"
        )
    return ShardSet(
        filesystem=filesystem,
        root=root,
        files=files,
        has_label="label" in schema.names,
        has_id="id" in schema.names,
    )


def first_image_size(shards: ShardSet) -> tuple[int, int] | None:
    """(width, height) of the first image of the first shard, from its header (one row read)."""
    with shards.filesystem.open_input_file(shards.files[0]) as stream:
        batch = next(pq.ParquetFile(stream).iter_batches(batch_size=1, columns=["image"]), None)
        if batch is None or not batch.num_rows:
            return None
        return header_size(image_bytes(batch.column(0)[0].as_py()))


def checked_shards(location: str) -> ShardSet:
    """`find_shards` with every file's footer checked (`check_footers`): for the checks before Ray
    starts, so a bad shard among thousands is named in one line instead of failing a worker."""
    shards = find_shards(location)
    shards.__dict__["num_rows"] = check_footers(shards)  # the cached property's value, read once
    return shards


def write_classes(folder: str, names: list[str]) -> None:
    filesystem, root = resolve_location(folder)
    with filesystem.open_output_stream(f"{root.rstrip('/')}/{CLASSES_FILE}") as stream:
        stream.write(json.dumps(names, indent=1).encode())


def read_classes(folder: str) -> list[str] | None:
    """Class names written beside the shards by `selfsup prepare`, if any."""
    filesystem, root = resolve_location(folder)
    path = f"{root.rstrip('/')}/{CLASSES_FILE}"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read())


def check_output_folder(out: str, overwrite: bool) -> None:
    """Refuse an output that is a file, or a folder already holding Parquet files unless
    `overwrite` (then its contents are deleted)."""
    filesystem, root = resolve_location(out)
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise DataError(f"--out {out}: is a file, expected a folder")
    if info.type == pafs.FileType.Directory:
        existing = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
        if any(e.path.endswith(".parquet") for e in existing):
            if not overwrite:
                raise DataError(f"--out {out}: already holds Parquet files; pass --overwrite to replace them")
            filesystem.delete_dir_contents(root)
