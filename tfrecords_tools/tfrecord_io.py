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
import struct

import google_crc32c

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
    if isinstance(value, (bytes, bytearray)):
        return _field(1, _field(1, bytes(value)))
    if isinstance(value, int):
        return _field(3, _field(1, _varint(value)))
    raise TypeError(f"unsupported feature value {type(value).__name__}")


@functools.lru_cache(maxsize=256)
def _key_field(key: str) -> bytes:
    """A map entry's key field: the same bytes for every record."""
    return _field(1, key.encode())


def serialize_example(features: dict) -> bytes:
    """A tf.train.Example from {name: bytes | int}, keys in sorted order."""
    entries = b"".join(
        _field(1, _key_field(key) + _field(2, encode_feature(features[key])))
        for key in sorted(features))
    return _field(1, entries)


def _masked_crc(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


class TFRecordWriter:
    """Appends records to an uncompressed or GZIP TFRecord file."""

    def __init__(self, path, compression: str = ""):
        self._file = open(path, "wb")
        if compression == "GZIP":
            import gzip

            # No file name and mtime=0 in the header: the same records give the same bytes.
            self._handle = gzip.GzipFile(filename="", mode="wb", fileobj=self._file, mtime=0)
        elif compression:
            raise ValueError(f"unsupported compression {compression!r}")
        else:
            self._handle = self._file

    def write(self, record: bytes) -> None:
        length = struct.pack("<Q", len(record))
        self._handle.write(length + _masked_crc(length) + record + _masked_crc(record))

    def close(self) -> None:
        self._handle.close()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
