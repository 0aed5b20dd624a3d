"""The MIME sniffer: a file's type comes from its first bytes, never from a claim.

relayd labels what it sends upstream and hands back to ChatGPT with ``sniff()``
(``docs/security.md#files-and-links``); a wrong label makes OpenAI refuse an image
or ChatGPT show a file as the wrong kind. The samples below are written out here,
not read from the module, so a changed signature fails a test.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.actions import mime
from relayd.actions.mime import EXTENSIONS, IMAGE_TYPES, sniff

OCTET = "application/octet-stream"

# (the first bytes of a real file of the kind, the type relayd must see in them)
SAMPLES = (
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image/png"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "image/jpeg"),
    (b"GIF87a\x01\x00\x01\x00", "image/gif"),
    (b"GIF89a\x01\x00\x01\x00", "image/gif"),
    (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "image/webp"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3", "application/pdf"),
    (b"PK\x03\x04\x14\x00\x06\x00", "application/zip"),
    (b"\x1aE\xdf\xa3\x9fB\x86\x81\x01", "video/webm"),
    (b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00", "video/mp4"),
    (b"ID3\x04\x00\x00\x00\x00\x00\x23", "audio/mpeg"),
    (b"OggS\x00\x02\x00\x00\x00\x00", "audio/ogg"),
    (b"fLaC\x00\x00\x00\x22\x10\x00", "audio/flac"),
    (b"RIFF\x24\x08\x00\x00WAVEfmt ", "audio/wav"),
)
# Signatures made of printable characters: a text may begin with one by chance.
_TEXT_SIGNATURES = (b"GIF87a", b"GIF89a", b"%PDF-", b"ID3", b"OggS", b"fLaC", b"RIFF")
SAMPLE_IDS = [f"{kind}:{head[:4]!r}" for head, kind in SAMPLES]


@pytest.mark.parametrize(("head", "kind"), SAMPLES, ids=SAMPLE_IDS)
def test_each_signature_is_recognised(head: bytes, kind: str) -> None:
    assert sniff(head) == kind
    assert kind in EXTENSIONS  # a handed-out file gets a name with its extension
    assert sniff(head + bytes(range(256)) * 4) == kind  # whatever follows


@settings(max_examples=60, deadline=None)
@given(sample=st.sampled_from(SAMPLES), tail=st.binary(max_size=1024))
def test_a_signature_wins_whatever_bytes_follow_it(sample: tuple[bytes, str], tail: bytes) -> None:
    head, kind = sample
    assert sniff(head + tail) == kind


def test_every_signature_the_module_declares_has_a_sample_here() -> None:
    declared = {media_type for _, _, media_type in mime._SIGNATURES}
    assert declared <= {kind for _, kind in SAMPLES}


def test_every_image_type_relayd_accepts_can_be_recognised() -> None:
    assert IMAGE_TYPES <= {kind for _, kind in SAMPLES}


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048))
def test_any_bytes_get_a_type_with_a_file_extension_and_never_an_error(data: bytes) -> None:
    kind = sniff(data)
    assert kind in EXTENSIONS  # handouts and payload name files by this table
    assert sniff(bytearray(data)) == sniff(memoryview(data)) == kind


@settings(max_examples=100, deadline=None)
@given(data=st.binary(min_size=512, max_size=2048))
def test_only_the_first_512_bytes_decide(data: bytes) -> None:
    assert sniff(data) == sniff(data[:512])


def test_nothing_at_all_is_octet_stream() -> None:
    assert sniff(b"") == OCTET


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b'{"model": "gpt-5"}', "application/json"),
        (b"  \n[1, 2, 3]", "application/json"),
        (b"name,size\nhello.png,12\n", "text/plain"),
        ("Grüße aus Köln\n".encode(), "text/plain"),
        (b"\x1b[31mred\x1b[0m\n", "text/plain"),  # ESC: terminal colours in a log
        (b"text\x00with a NUL", OCTET),
        (b"\x01\x02\x03\x04", OCTET),
        (b"caf\xe9 in Latin-1", OCTET),
    ],
    ids=["json-object", "json-array", "csv", "utf-8", "ansi-escapes", "nul", "control", "latin-1"],
)
def test_text_is_told_from_binary(data: bytes, kind: str) -> None:
    assert sniff(data) == kind


def test_the_window_is_512_bytes() -> None:
    assert sniff(b"a" * 500 + b"\x00") == OCTET  # a NUL inside the window
    assert sniff(b"a" * 512 + b"\x00") == "text/plain"  # one past it


def test_a_character_cut_at_the_512th_byte_is_still_text() -> None:
    data = ("a" + "é" * 400).encode()  # byte 512 falls inside an "é"
    assert sniff(data) == "text/plain"


@settings(max_examples=100, deadline=None)
@given(
    text=st.text(
        st.characters(blacklist_categories=["Cc", "Cs"]) | st.sampled_from("\t\n\r"),
        min_size=1,
        max_size=600,
    )
)
def test_printable_utf8_text_is_text(text: str) -> None:
    data = text.encode()
    kind = sniff(data)
    if kind not in ("text/plain", "application/json"):
        # Only a text that happens to begin with a signature may be something else.
        assert data.startswith(_TEXT_SIGNATURES) or data[4:8] == b"ftyp", kind
