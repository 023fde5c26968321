"""Archives of training photos: good ones, and one of each kind a training must refuse, with words of its refusal."""

import io
import stat
import tarfile
import zipfile

from models.limits import MAX_ARCHIVE_MEMBERS, MAX_TRAINING_IMAGES
from models.tooling.pictures import photo, png_bytes
from tests.support.editing import png_header_only

SIZES = ((96, 64), (64, 96), (80, 80))
"""Three photos of three aspects: landscape, portrait, square."""


def zip_of(files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return buffer.getvalue()


def tar_entries(*entries: tarfile.TarInfo, gz: bool = False) -> bytes:
    """A tar of bare headers (links, or files whose declared size has no data behind it)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as archive:
        for entry in entries:
            archive.addfile(entry, io.BytesIO(b"\0" * entry.size) if entry.size < 1024**2 else None)
    return buffer.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


def training_photos(scale: int = 1, seed: int = 0) -> dict[str, bytes]:
    """Three photos (sizes times `scale`) and a caption for the first."""
    files = {f"photos/p{index}.png": png_bytes(photo(width * scale, height * scale, seed=seed + index))
             for index, (width, height) in enumerate(SIZES)}  # fmt: skip
    files["photos/p0.txt"] = b"a TOK on a table"
    return files


def encrypted() -> bytes:
    """A zip whose member says it is encrypted: zipfile cannot encrypt, so the flag is set in both of its headers."""
    content = bytearray(zip_of({"secret.png": b"ciphertext"}))
    content[content.index(b"PK\x03\x04") + 6] |= 0x1
    content[content.index(b"PK\x01\x02") + 8] |= 0x1
    return bytes(content)


def corrupt_deflate() -> bytes:
    """A zip whose one member's deflated bytes are damaged after its header."""
    content = bytearray(zip_of({"a.png": png_bytes(photo(64, 64))}))
    start = content.index(b"a.png") + len("a.png")
    content[start + 40 : start + 80] = bytes(40)
    return bytes(content)


def long_name_tar() -> bytes:
    """A tar whose GNU long-name header is 100 KiB (tarfile reads such headers whole)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        archive.addfile(entry("x" * 100_000 + ".png", size=4), io.BytesIO(b"\0" * 4))
    return buffer.getvalue()


def compressed_tar(files: dict[str, bytes], compression: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}") as archive:
        for name, data in files.items():
            archive.addfile(entry(name, size=len(data)), io.BytesIO(data))
    return buffer.getvalue()


def bomb() -> bytes:
    """A 16 MiB picture of zeros, deflated to a few kilobytes: a thousandfold."""
    return zip_of({"bomb.png": b"\0" * (16 * 1024**2)})


def hostile_archives() -> dict[str, tuple[bytes, str]]:
    """Each archive a training refuses, and a piece of its one-line refusal."""
    tiny_png = png_bytes(photo(8, 8))
    too_many = {f"{index}.png": tiny_png for index in range(MAX_TRAINING_IMAGES + 1)}
    return {
        "empty-file": (b"", "the file is empty"),
        "not-an-archive": (b"just some text, no archive", "not a .zip or .tar archive"),
        "empty-zip": (zip_of({}), "holds no pictures"),
        "no-pictures": (zip_of({"notes.md": b"hello"}), "holds no pictures"),
        "unreadable-picture": (zip_of({"a.png": b"\x89PNG not really"}), "a.png: not a readable picture"),
        "dot-dot": (zip_of({"../escape.png": tiny_png}), "points outside the archive's folder"),
        "absolute": (tar_entries(entry("/etc/escape.png", size=10)), "points outside the archive's folder"),
        "windows-drive": (zip_of({"C:/escape.png": tiny_png}), "points outside the archive's folder"),
        "zip-symlink": (zip_of({"a.png": tiny_png}, symlinks={"b.png": "/etc/passwd"}), "b.png is a link"),
        "tar-symlink": (tar_entries(entry("b.png", tarfile.SYMTYPE, link="/etc/passwd")), "b.png is a link"),
        "tar-hardlink": (tar_entries(entry("b.png", tarfile.LNKTYPE, link="/etc/passwd")), "b.png is a link"),
        "tar-device": (tar_entries(entry("zero.png", tarfile.CHRTYPE)), "a device or pipe"),
        "zip-bomb": (bomb(), "expands"),
        "declared-too-large": (tar_entries(entry("huge.png", size=9 * 1024**3)), "at most 64 MiB"),
        "too-many-pictures": (zip_of(too_many), f"{MAX_TRAINING_IMAGES + 1} pictures; at most {MAX_TRAINING_IMAGES}"),
        "over-the-pixel-limit": (zip_of({"big.png": png_header_only(8000, 8000)}), "larger than 50,000,000 pixels"),
        "caption-not-text": (zip_of({"a.png": tiny_png, "a.txt": b"\xff\xfe\x00\x01binary"}), "is not UTF-8 text"),
        "caption-control-characters": (zip_of({"a.png": tiny_png, "a.txt": b"a\x00b"}), "is not text"),
        "caption-too-long": (zip_of({"a.png": tiny_png, "a.txt": b"a" * 20_000}), "a.txt is 19.5 KiB; at most 16 KiB"),
        "encrypted": (encrypted(), "secret.png is encrypted"),
        "name-with-a-line-break": (zip_of({"a\nFAKE LOG LINE.png": tiny_png}), "control characters in its name"),
        "corrupt-deflate": (corrupt_deflate(), "the .zip is damaged"),
        "tar-expands": (tar_entries(*(entry(f"{index}.png", size=10 * 1024**2) for index in range(20))), "expands"),
        "long-tar-header": (long_name_tar(), "an extended tar header of 97.7 KiB"),
        "huge-zip-index": (
            zip_of({f"{index:04d}" + "x" * 1000 + ".png": b"" for index in range(1100)}),
            "the .zip's index is 1.1 MiB; at most 1 MiB",
        ),
        "too-many-entries": (
            zip_of({f"{index}.md": b"" for index in range(MAX_ARCHIVE_MEMBERS + 1)}),
            "2,001 entries; at most 2,000",
        ),
    }
