"""multipart/form-data bodies (RFC 7578) split into their parts in a few C-level scans of the body.

Starlette's form parser runs python-multipart's per-byte callbacks in Python and spools every file part into a
temporary file: about 27 us per part measured alone and 58 us per image under load, a third of the event loop's
time for 32-image requests (docs/serving.md, "HTTP overhead"). A classify body is a few small parts already in
memory (the body limit bounds it), so the parts are found with bytes.find and sliced out; each part's
Content-Disposition is read by python-multipart's own header parser.
"""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart.multipart import parse_options_header


class MultipartError(ValueError):
    """A body that is not valid multipart/form-data: the message says what is wrong."""


@dataclass
class Part:
    name: str
    filename: str | None  # None: a text field (no filename parameter), not a file upload
    data: bytes


def boundary_of(content_type: str) -> bytes:
    ctype, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise MultipartError("the Content-Type has no boundary parameter")
    if len(boundary) > 200:
        raise MultipartError("the boundary is longer than 200 characters")
    return boundary


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def parse(body: bytes, content_type: str, max_parts: int) -> list[Part]:
    """The parts of a multipart/form-data body, in order. Raises MultipartError for a body without a boundary,
    with no closing delimiter, a part without a blank line after its headers or without a Content-Disposition
    naming it, or more than max_parts parts."""
    delimiter = b"--" + boundary_of(content_type)
    # The first delimiter starts the body or follows a preamble's line break.
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:
        start = body.find(b"\r\n" + delimiter)
        if start < 0:
            raise MultipartError("no part starts with the boundary the Content-Type names")
        pos = start + 2 + len(delimiter)
    separator = b"\r\n" + delimiter
    parts: list[Part] = []
    while True:
        if body.startswith(b"--", pos):
            return parts  # the closing delimiter; an epilogue after it is ignored
        line_end = body.find(b"\r\n", pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise MultipartError("a boundary line is not followed by a line break (a truncated body?)")
        head_start = line_end + 2
        head_end = body.find(b"\r\n\r\n", head_start - 2)
        if head_end < 0:
            raise MultipartError(f"part {len(parts)} has no blank line after its headers")
        data_end = body.find(separator, head_end + 4)
        if data_end < 0:
            raise MultipartError("the body ends before its closing boundary (a truncated body?)")
        if len(parts) >= max_parts:
            raise MultipartError(f"more than {max_parts} parts")
        parts.append(_part(body[head_start:head_end], body[head_end + 4:data_end], len(parts)))
        pos = data_end + len(separator)


def _part(head: bytes, data: bytes, index: int) -> Part:
    disposition = None
    for line in head.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon:
            if line.strip():
                raise MultipartError(f"part {index} has a header line without a colon")
            continue
        if name.strip().lower() == b"content-disposition":
            disposition = value.strip()
    if disposition is None:
        raise MultipartError(f"part {index} has no Content-Disposition header")
    kind, options = parse_options_header(disposition)
    if kind.lower() != b"form-data" or b"name" not in options:
        raise MultipartError(f"part {index}'s Content-Disposition is not form-data with a name")
    filename = options.get(b"filename")
    return Part(_decode(options[b"name"]), None if filename is None else _decode(filename), data)
