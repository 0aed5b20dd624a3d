"""Media types told from the bytes themselves, not from what a sender claims.

ChatGPT derives a user file's ``mime_type`` from its extension, and a base64 payload
carries whatever the model wrote; relayd labels what it sends upstream and hands
back by looking at the first bytes instead (the WHATWG MIME Sniffing signatures,
§6.1 images, §6.2 audio/video, plus PDF and ZIP).
"""

from __future__ import annotations

from typing import Final

__all__ = ["EXTENSIONS", "IMAGE_TYPES", "sniff"]

# (offset, signature, media type); the first match wins.
_SIGNATURES: Final = (
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (0, b"%PDF-", "application/pdf"),
    (0, b"PK\x03\x04", "application/zip"),
    (0, b"\x1aE\xdf\xa3", "video/webm"),
    (0, b"ID3", "audio/mpeg"),
    (0, b"OggS", "audio/ogg"),
    (0, b"fLaC", "audio/flac"),
    (4, b"ftyp", "video/mp4"),
)

IMAGE_TYPES: Final = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif"})

EXTENSIONS: Final = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "application/pdf": ".pdf",
    "application/zip": ".zip",
    "video/mp4": ".mp4",
    "video/webm": ".webm",
    "audio/mpeg": ".mp3",
    "audio/wav": ".wav",
    "audio/ogg": ".ogg",
    "audio/flac": ".flac",
    "text/plain": ".txt",
    "application/json": ".json",
    "application/octet-stream": ".bin",
}


def sniff(data: bytes | bytearray | memoryview) -> str:
    """The media type the bytes show; ``application/octet-stream`` when unsure."""
    head = bytes(data[:512])
    for offset, signature, media_type in _SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return media_type
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    return _text_type(head) if head else "application/octet-stream"


def _text_type(head: bytes) -> str:
    # Binary data has control bytes early; text (UTF-8, JSON, CSV, code) has none.
    if any(b < 0x09 or 0x0E <= b < 0x20 for b in head if b != 0x1B):
        return "application/octet-stream"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not merely a character cut at the 512th byte
            return "application/octet-stream"
    if head.lstrip()[:1] in (b"{", b"["):
        return "application/json"
    return "text/plain"
