"""Archives of training photos: good ones, and one of each kind a training must refuse, with words of its refusal."""

import io
import stat
import tarfile
import zipfile

from models.limits import MAX_TRAINING_IMAGES
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
    }
