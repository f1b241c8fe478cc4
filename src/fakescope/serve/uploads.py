"""Reading uploads from a request body as it streams in, with limits checked on the way.

Nothing is written to disk: the bytes of each file part are kept in memory, and a part or a body
over its limit stops the read at once (HTTP 413), before the rest of the body is received.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from fakescope.serve.errors import ApiError

PART_OVERHEAD = 16 * 1024
"""Bytes allowed per file for multipart boundaries and part headers when bounding a whole body."""
FIELD_LIMIT = 64 * 1024
"""Largest non-file form field accepted (they are ignored, but still bounded)."""


@dataclass
class Upload:
    filename: str
    data: bytes


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)
    is_file: bool = False


def _too_large(message: str) -> ApiError:
    return ApiError(413, "too_large", message)


class _Collector:
    """Callbacks for python-multipart's streaming parser: keeps the parts named ``file``."""

    def __init__(self, field_name: str, max_file_size: int, max_files: int) -> None:
        self.field_name = field_name
        self.max_file_size = max_file_size
        self.max_files = max_files
        self.files: list[Upload] = []
        self.part: _Part | None = None
        self._hname = bytearray()
        self._hvalue = bytearray()
        self.ended = False

    def callbacks(self) -> dict:
        return {"on_part_begin": self.part_begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.part_data,
                "on_part_end": self.part_end, "on_end": self.end}

    def part_begin(self) -> None:
        self.part = _Part()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def header_end(self) -> None:
        assert self.part is not None
        self.part.headers[self._hname.decode("latin-1").strip().lower()] = self._hvalue.decode("utf-8", "replace")
        self._hname.clear()
        self._hvalue.clear()

    def headers_finished(self) -> None:
        part = self.part
        assert part is not None
        disposition = part.headers.get("content-disposition")
        if disposition is None:
            raise ApiError(400, "bad_request", "expected a Content-Disposition header in every multipart part")
        _, params = parse_options_header(disposition)
        name = params.get(b"name")
        part.name = name.decode("utf-8", "replace") if name is not None else None
        filename = params.get(b"filename")
        part.filename = filename.decode("utf-8", "replace")[:255] if filename is not None else None
        part.is_file = part.name == self.field_name
        if part.is_file and len(self.files) >= self.max_files:
            raise _too_large(f"too many files in one request (limit {self.max_files}): send them in several requests")

    def part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        assert part is not None
        limit = self.max_file_size if part.is_file else FIELD_LIMIT
        if len(part.data) + (end - start) > limit:
            what = f"file {part.filename or part.name!r}" if part.is_file else f"form field {part.name!r}"
            raise _too_large(f"{what} is larger than the limit of {limit} bytes (the server's --max-file-size)")
        part.data += data[start:end]

    def part_end(self) -> None:
        part = self.part
        if part is not None and part.is_file:
            self.files.append(Upload(part.filename or f"file {len(self.files) + 1}", bytes(part.data)))
        self.part = None

    def end(self) -> None:
        self.ended = True


def _content_length(headers) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ApiError(400, "bad_request", f"expected a numeric Content-Length, got {value!r}") from None
    if n < 0:
        raise ApiError(400, "bad_request", f"expected a Content-Length >= 0, got {n}")
    return n


async def read_uploads(headers, stream: AsyncIterator[bytes], *, max_file_size: int, max_files: int,
                       field_name: str = "file") -> list[Upload]:
    """The files of a ``multipart/form-data`` body (every part named ``field_name``) or of a raw
    ``image/*`` body. Raises :class:`ApiError` 400 (malformed), 413 (too large, found while
    streaming) or 415 (neither multipart nor an image content type)."""
    content_type = headers.get("content-type", "")
    media, params = parse_options_header(content_type)
    media_type = media.decode("latin-1").lower()
    length = _content_length(headers)
    if media_type.startswith("image/"):
        if length is not None and length > max_file_size:
            raise _too_large(f"the image is {length} bytes, over the limit of {max_file_size} bytes "
                             f"(the server's --max-file-size)")
        buf = bytearray()
        async for chunk in stream:
            if len(buf) + len(chunk) > max_file_size:
                raise _too_large(f"the image is larger than the limit of {max_file_size} bytes "
                                 f"(the server's --max-file-size)")
            buf += chunk
        name = "upload"
        disposition = headers.get("content-disposition")
        if disposition:
            filename = parse_options_header(disposition)[1].get(b"filename")
            if filename:
                name = filename.decode("utf-8", "replace")[:255]
        return [Upload(name, bytes(buf))]
    if media_type == "multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise ApiError(400, "bad_request", "expected a boundary parameter in the multipart/form-data Content-Type")
        body_limit = max_files * (max_file_size + PART_OVERHEAD) + FIELD_LIMIT
        if length is not None and length > body_limit:
            raise _too_large(f"the request body is {length} bytes, over the limit of {body_limit} bytes "
                             f"({max_files} files of at most {max_file_size} bytes)")
        collector = _Collector(field_name, max_file_size, max_files)
        try:
            parser = MultipartParser(boundary, collector.callbacks())
        except (ValueError, MultipartParseError) as e:
            raise ApiError(400, "bad_request", f"malformed multipart boundary ({e})") from None
        received = 0
        async for chunk in stream:
            received += len(chunk)
            if received > body_limit:
                raise _too_large(f"the request body is over the limit of {body_limit} bytes "
                                 f"({max_files} files of at most {max_file_size} bytes)")
            try:
                parser.write(chunk)
            except MultipartParseError as e:
                raise ApiError(400, "bad_request", f"malformed multipart body ({e})") from None
        if not collector.ended:
            raise ApiError(400, "bad_request", "incomplete multipart body (no closing boundary)")
        if not collector.files:
            raise ApiError(400, "bad_request", f"expected at least one file in a form field named {field_name!r}")
        return collector.files
    if not media_type:
        raise ApiError(415, "unsupported_media_type",
                       "expected a Content-Type of multipart/form-data (field 'file') or image/*, got none")
    raise ApiError(415, "unsupported_media_type",
                   f"expected a Content-Type of multipart/form-data (field 'file') or image/*, got {media_type}")
