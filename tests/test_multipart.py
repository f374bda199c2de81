"""service/rest/multipart.py: the multipart/form-data splitter of the v1 API, against the bodies real clients send
(httpx, curl's form) and the ways a body can be broken."""

from __future__ import annotations

import httpx
import pytest

from reskd.service.rest.multipart import MultipartError, parse


def encoded(files=None, data=None) -> tuple[bytes, str]:
    """A body and its Content-Type as httpx builds them (the same layout as curl -F and browsers)."""
    request = httpx.Request("POST", "http://x/", files=files, data=data)
    return request.read(), request.headers["content-type"]


def test_the_parts_httpx_sends_come_back_byte_for_byte_in_order():
    blobs = [bytes(range(256)) * 3, b"\r\n--not-the-boundary\r\n\r\n", b"", b"x" * 100_000]
    body, ctype = encoded(files=[("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)],
                          data={"note": "text"})
    parts = parse(body, ctype, max_parts=10)
    assert [(p.name, p.filename) for p in parts] == [("note", None)] + [("file", f"{i}.png") for i in range(4)]
    assert parts[0].data == b"text" and [p.data for p in parts[1:]] == blobs


def test_filenames_as_starlette_read_them_quoted_escaped_or_not_ascii():
    # httpx, like browsers, percent-encodes a quote in a filename; Starlette's parser leaves it so, and so does ours.
    body, ctype = encoded(files=[("file", ('a "b" ; c.png', b"1")), ("file", ("größe ✓.png", b"2"))])
    assert [p.filename for p in parse(body, ctype, 5)] == ["a %22b%22 ; c.png", "größe ✓.png"]
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x\\"y.png"\r\n\r\n1\r\n--b--'
    assert parse(body, "multipart/form-data; boundary=b", 5)[0].filename == 'x"y.png'  # a backslash escape


def test_a_preamble_an_epilogue_a_quoted_boundary_and_extra_headers_are_accepted():
    body = (b"preamble\r\n--b-1\r\nContent-Type: image/png\r\ncontent-disposition: form-data; name=\"file\"; "
            b"filename=\"a.png\"\r\n\r\nPNG\r\n--b-1--\r\nepilogue")
    [part] = parse(body, 'multipart/form-data; boundary="b-1"', 5)
    assert (part.name, part.filename, part.data) == ("file", "a.png", b"PNG")


@pytest.mark.parametrize("body, ctype, message", [
    (b"--b\r\n\r\nx\r\n--b--", "multipart/form-data", "no boundary"),
    (b"nothing here", "multipart/form-data; boundary=b", "no part starts with the boundary"),
    (b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc', "multipart/form-data; boundary=b",
     "before its closing boundary"),
    (b'--b\r\nContent-Disposition: form-data; name="file"', "multipart/form-data; boundary=b", "no blank line"),
    (b"--b\r\nContent-Type: image/png\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b",
     "no Content-Disposition"),
    (b"--b\r\nnonsense\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b", "without a colon"),
    (b"--b\r\nContent-Disposition: attachment\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b",
     "not form-data with a name"),
    (b'--bjunk\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n--b--', "multipart/form-data; boundary=b",
     "not followed by a line break"),
])
def test_broken_bodies_are_refused_with_what_is_wrong(body, ctype, message):
    with pytest.raises(MultipartError, match=message):
        parse(body, ctype, 5)


def test_the_part_count_is_bounded_before_the_parts_are_kept():
    body, ctype = encoded(files=[("file", (f"{i}.png", b"x")) for i in range(6)])
    assert len(parse(body, ctype, 6)) == 6
    with pytest.raises(MultipartError, match="more than 5 parts"):
        parse(body, ctype, 5)


def test_every_truncation_of_a_valid_body_is_refused_or_parsed_never_an_unexpected_error():
    body, ctype = encoded(files=[("file", ("a.png", b"\x89PNG\r\n" * 5)), ("file", ("b.png", b"--\r\n"))])
    for end in range(len(body)):
        try:
            parts = parse(body[:end], ctype, 5)
        except MultipartError:
            continue
        # A cut inside the epilogue or the final CRLF leaves every part whole.
        assert [p.data for p in parts] == [b"\x89PNG\r\n" * 5, b"--\r\n"], end
