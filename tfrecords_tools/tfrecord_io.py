"""Writing TFRecord files without importing TensorFlow.

convert's worker processes only write bytes; importing TensorFlow (~7 s per
process here) would cost more than cutting the sample data's crops. A record is
the TFRecord framing (length, masked CRC32C, data, masked CRC32C; CRC32C by
google-crc32c) around a tf.train.Example in protobuf wire format with map keys in sorted order, so that the same cell gives
the same bytes in any process; tests/test_tfrecord_io.py checks that TensorFlow
parses it to the very message tf.train.Example builds.
"""
from __future__ import annotations

import functools
import hashlib
import struct
import zlib

import google_crc32c

from tfrecords_tools.stages import StageTimer

_SMALL = [bytes([v]) for v in range(128)]  # one-byte varints, the most common by far


def _varint(value: int) -> bytes:
    if 0 <= value < 128:
        return _SMALL[value]
    value &= (1 << 64) - 1  # negative int64 as two's complement, 10 bytes
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_feature(value) -> bytes:
    """One tf.train.Feature: bytes -> BytesList, int -> Int64List (packed)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _field(1, _field(1, bytes(value)))
    if isinstance(value, int):
        return _field(3, _field(1, _varint(value)))
    raise TypeError(f"unsupported feature value {type(value).__name__}")


@functools.lru_cache(maxsize=256)
def _key_field(key: str) -> bytes:
    """A map entry's key field: the same bytes for every record."""
    return _field(1, key.encode())


@functools.lru_cache(maxsize=1024)
def _bytes_entry_head(key: str, size: int) -> bytes:
    """A map entry of a BytesList of one `size`-byte value, up to the value itself: it depends
    on the key and the size only, so records of one shape share it."""
    feature = _varint(1 << 3 | 2) + _varint(size + 1 + len(_varint(size))) \
        + _varint(1 << 3 | 2) + _varint(size)
    value_field = len(feature) + size
    body = len(_key_field(key)) + 1 + len(_varint(value_field)) + value_field
    return _varint(1 << 3 | 2) + _varint(body) + _key_field(key) + _varint(2 << 3 | 2) \
        + _varint(value_field) + feature


def _entry(key: str, value) -> list:
    """A map entry's bytes, as pieces to join (a bytes value is not copied here)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return [_bytes_entry_head(key, len(value) if not isinstance(value, memoryview)
                                  else value.nbytes), value]
    return [_int_entry(key, value)]


@functools.lru_cache(maxsize=1 << 16)
def _int_entry(key: str, value: int) -> bytes:
    """A map entry of an Int64List of one value (object numbers and treatment indices repeat
    from field to field: made once each)."""
    return _field(1, _key_field(key) + _field(2, encode_feature(value)))


def serialize_example(features: dict) -> bytes:
    """A tf.train.Example from {name: bytes | memoryview | int}, keys in sorted order."""
    pieces = [piece for key in sorted(features) for piece in _entry(key, features[key])]
    size = sum(len(p) if not isinstance(p, memoryview) else p.nbytes for p in pieces)
    return b"".join([_varint(1 << 3 | 2), _varint(size)] + pieces)


def _masked_crc(data) -> bytes:
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def frame_records(records) -> bytes:
    """Records in the TFRecord framing, one after the other, as one block of bytes."""
    pieces = []
    for record in records:
        length = struct.pack("<Q", len(record))
        pieces += (length, _masked_crc(length), record, _masked_crc(record))
    return b"".join(pieces)


COMPRESSIONS = ("", "GZIP", "ZLIB")


class _Gzip:
    """A gzip stream as gzip.GzipFile(filename="", mtime=0) writes it, byte for byte (header,
    raw deflate, CRC32 and size), so that compressing is a stage of its own."""

    def __init__(self, level: int):
        xfl = b"\002" if level == 9 else b"\004" if level == 1 else b"\000"
        self.head = b"\037\213\010\000" + struct.pack("<L", 0) + xfl + b"\377"
        self._deflate = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS,
                                         zlib.DEF_MEM_LEVEL, 0)
        self._crc, self._size = 0, 0

    def compress(self, data: bytes) -> bytes:
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        out = self._deflate.compress(data)
        if self.head:
            out, self.head = self.head + out, b""
        return out

    def flush(self) -> bytes:
        return self.compress(b"") + self._deflate.flush() + struct.pack(
            "<LL", self._crc, self._size & 0xFFFFFFFF)


class TFRecordWriter:
    """Appends records to an uncompressed, GZIP or ZLIB TFRecord file (GZIP: level 9 unless
    `level` says otherwise, the bytes gzip.GzipFile writes), keeping the sha256 of the bytes
    written (`sha256`, once closed) and, with a StageTimer, the seconds spent compressing,
    writing and hashing."""

    def __init__(self, path, compression: str = "", level: int = 9, timer=None):
        if compression not in COMPRESSIONS:
            raise ValueError(f"unsupported compression {compression!r}")
        self._file = open(path, "wb")
        self._hash = hashlib.sha256()
        self._timer = timer or StageTimer()
        self._codec = _Gzip(level) if compression == "GZIP" else \
            zlib.compressobj(level) if compression == "ZLIB" else None
        self.sha256 = None

    def write(self, record: bytes) -> None:
        self.write_many([record])

    def write_many(self, records) -> None:
        """Records written as one block: one framing pass, one compress and one write call."""
        with self._timer.stage("serialize"):
            block = frame_records(records)
        self._put(block)

    def _put(self, block: bytes) -> None:
        if self._codec is not None:
            with self._timer.stage("compress"):
                block = self._codec.compress(block)
        with self._timer.stage("write"):
            self._file.write(block)
        with self._timer.stage("checksum"):
            self._hash.update(block)

    def close(self) -> None:
        if self._file.closed:
            return
        if self._codec is not None:
            with self._timer.stage("compress"):
                tail = self._codec.flush()
            self._codec = None
            self._put(tail)
        self._file.close()
        self.sha256 = self._hash.hexdigest()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
