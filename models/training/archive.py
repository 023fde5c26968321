"""The photos of a training, taken out of an uploaded .zip or .tar without trusting any field of it.

Every member's name, kind and size is checked from the archive's index before a byte is unpacked: names that would
escape a folder (`../`, absolute, a drive), links, devices and encrypted members are refused; declared sizes are held
to limits and to a plausible compression ratio (a zip bomb declares a thousandfold); and each member is read with a
byte cap, since an index can lie. Members are copied to files of our own naming in the work folder (never to a name
from the archive), and pictures are then decoded by models/pictures/read.py with the limits of the `image` input.
"""

import logging
import lzma
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from ..errors import InputError
from ..limits import (
    MAX_ARCHIVE_MEMBERS,
    MAX_ARCHIVE_RATIO,
    MAX_ARCHIVE_UNPACKED_BYTES,
    MAX_CAPTION_BYTES,
    MAX_INPUT_BYTES,
    MAX_PROMPT_CHARS,
    MAX_TRAINING_ARCHIVE_BYTES,
    MAX_TRAINING_IMAGES,
)
from ..loras.messages import human_size, listed, one_line
from ..pictures.read import READABLE_NAMES

log = logging.getLogger(__name__)

NAME = "input_images"
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif")
CAPTION_SUFFIX = ".txt"
ZIP_TAIL_BYTES = 22 + 65535 + 20
"""A zip's end record (22 bytes and a comment of up to 64 KiB) and the zip64 locator before it."""
MAX_ZIP_INDEX_BYTES = 1024**2
"""Largest zip central directory read: 2,000 entries with names of a few hundred characters."""
MAX_TAR_HEADER_BYTES = 64 * 1024
EXTENDED_HEADERS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                    tarfile.SOLARIS_XHDTYPE)  # fmt: skip
RATIO_FREE_BYTES = 1024**2
"""Below this many unpacked bytes, a member's compression ratio is not judged (small files compress well)."""
CHUNK_BYTES = 1024**2


@dataclass(frozen=True)
class Member:
    """One regular file of the archive, as its index declares it."""

    name: str
    size: int
    packed: int
    entry: Any = field(default=None, compare=False, repr=False)
    """The archive's own record (ZipInfo, TarInfo), to open this member even where two share a name."""


@dataclass(frozen=True)
class Photo:
    """A picture of the archive, copied to a file of our naming, and its caption (None when it has none)."""

    name: str
    path: Path
    caption: str | None


def escapes(name: str) -> bool:
    """Whether a member's name would leave the folder it is unpacked in: absolute, a drive, or a `..` part."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts


def skipped(name: str) -> bool:
    """Folders' metadata that archivers add (macOS's __MACOSX and ._ files, hidden files): not the user's photos."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return not parts or parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts)


def check_name(name: str) -> None:
    """A name that escapes, or holds control characters (a line break would forge a log line), is refused."""
    if escapes(name):
        raise InputError(f"{NAME}: the entry {one_line(name, 80)!r} points outside the archive's folder; refused")
    if any(not character.isprintable() for character in name):
        raise InputError(f"{NAME}: the entry {one_line(name, 80)!r} has control characters in its name; refused")


def check_member(member: Member) -> None:
    """A member's declared size within its limit, and its expansion (when its packed size is known) not a bomb's."""
    limit = MAX_CAPTION_BYTES if member.name.lower().endswith(CAPTION_SUFFIX) else MAX_INPUT_BYTES
    if member.size > limit and is_used(member.name):
        raise InputError(
            f"{NAME}: {one_line(member.name, 80)} is {human_size(member.size)}; at most {human_size(limit)}"
        )
    if member.size > RATIO_FREE_BYTES and member.size > MAX_ARCHIVE_RATIO * max(member.packed, 1):
        raise InputError(
            f"{NAME}: {one_line(member.name, 80)} expands {member.size // max(member.packed, 1):,}-fold; at most"
            f" {MAX_ARCHIVE_RATIO}-fold (a zip bomb?)"
        )


def check_total(total: int, archive_bytes: int) -> None:
    """The whole archive's unpacked size within the limit, and its expansion not a bomb's."""
    if total > MAX_ARCHIVE_UNPACKED_BYTES:
        raise InputError(f"{NAME}: unpacks to {human_size(total)}; at most {human_size(MAX_ARCHIVE_UNPACKED_BYTES)}")
    if total > RATIO_FREE_BYTES and total > MAX_ARCHIVE_RATIO * archive_bytes:
        raise InputError(f"{NAME}: expands {total // archive_bytes:,}-fold; at most {MAX_ARCHIVE_RATIO}-fold (a bomb?)")


def zip_index_bytes(path: Path) -> int:
    """The size of a zip's central directory, from its end record (zip64's when it has one), read before zipfile
    parses the directory whole: a directory of millions of records would take gigabytes to parse."""
    with path.open("rb") as file:
        file.seek(0, 2)
        tail_start = max(0, file.tell() - ZIP_TAIL_BYTES)
        file.seek(tail_start)
        tail = file.read()
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or len(tail) < end + 22:
        raise InputError(f"{NAME}: the .zip has no end record (truncated?)")
    index_bytes = struct.unpack_from("<I", tail, end + 12)[0]
    locator = end - 20
    if index_bytes == 0xFFFFFFFF and locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
        with path.open("rb") as file:
            file.seek(struct.unpack_from("<Q", tail, locator + 8)[0])
            record = file.read(56)
        if len(record) < 56 or record[:4] != b"PK\x06\x06":
            raise InputError(f"{NAME}: the .zip's zip64 end record is damaged")
        index_bytes = struct.unpack_from("<Q", record, 40)[0]
    return index_bytes


def zip_members(archive: zipfile.ZipFile) -> list[Member]:
    members = []
    for info in archive.infolist():
        check_name(info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise InputError(f"{NAME}: {one_line(info.filename, 80)} is a link; give the pictures themselves")
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            raise InputError(f"{NAME}: {one_line(info.filename, 80)} is encrypted; give an archive without a password")
        members.append(Member(info.filename, info.file_size, info.compress_size, info))
        check_member(members[-1])
    return members


class BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose extended headers (GNU long names, pax records) are refused above MAX_TAR_HEADER_BYTES:
    tarfile reads their bodies whole into memory before it returns the member they describe."""

    def _proc_member(self, tarfile_):  # tarfile's hook for a header's own processing
        if self.type in EXTENDED_HEADERS and self.size > MAX_TAR_HEADER_BYTES:
            raise InputError(f"{NAME}: an extended tar header of {human_size(self.size)}; at most 64 KiB")
        return super()._proc_member(tarfile_)


def tar_members(archive: tarfile.TarFile, archive_bytes: int) -> list[Member]:
    """A tar's index is its headers, spread through the stream: each is judged as it is reached, and the running
    total checked before the next is looked for, so a compressed bomb is refused before it is inflated."""
    members, total = [], 0
    for count, info in enumerate(archive, start=1):
        if count > MAX_ARCHIVE_MEMBERS:
            raise InputError(f"{NAME}: more than {MAX_ARCHIVE_MEMBERS:,} entries; at most {MAX_ARCHIVE_MEMBERS:,}")
        check_name(info.name)
        if info.issym() or info.islnk():
            raise InputError(f"{NAME}: {one_line(info.name, 80)} is a link; give the pictures themselves")
        if info.isdir():
            continue
        if not info.isfile():
            raise InputError(f"{NAME}: {one_line(info.name, 80)} is a device or pipe, not a file")
        members.append(Member(info.name, info.size, info.size, info))  # packed sizes are the stream's, not a member's
        check_member(members[-1])
        total += info.size
        check_total(total, archive_bytes)
    return members


def is_picture(name: str) -> bool:
    return name.lower().endswith(PICTURE_SUFFIXES)


def is_used(name: str) -> bool:
    return not skipped(name) and (is_picture(name) or name.lower().endswith(CAPTION_SUFFIX))


@contextmanager
def opened(path: Path) -> Iterator[tuple[list[Member], Callable[[Any], IO[bytes]]]]:
    """The archive's checked members and a function opening one of them, for a .zip or a (compressed) .tar."""
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{NAME}: the file is empty; give a .zip or .tar of photos")
    if size > MAX_TRAINING_ARCHIVE_BYTES:
        raise InputError(f"{NAME}: the file is {human_size(size)}; at most {human_size(MAX_TRAINING_ARCHIVE_BYTES)}")
    if zipfile.is_zipfile(path):
        if (index_bytes := zip_index_bytes(path)) > MAX_ZIP_INDEX_BYTES:
            raise InputError(f"{NAME}: the .zip's index is {human_size(index_bytes)}; at most 1 MiB (2,000 entries)")
        try:
            with zipfile.ZipFile(path) as archive:
                members = zip_members(archive)
                if len(members) > MAX_ARCHIVE_MEMBERS:
                    raise InputError(f"{NAME}: {len(members):,} entries; at most {MAX_ARCHIVE_MEMBERS:,}")
                check_total(sum(member.size for member in members), size)
                yield members, archive.open
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, zlib.error) as error:
            raise InputError(f"{NAME}: the .zip is damaged ({one_line(str(error), 100)})") from None
        return
    try:
        with tarfile.open(path, "r:*", tarinfo=BoundedTarInfo) as archive:
            members = tar_members(archive, size)
            yield members, archive.extractfile
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as error:
        if isinstance(error, tarfile.ReadError) and "file could not be opened" in str(error):
            raise InputError(f"{NAME}: not a .zip or .tar archive; give one of photos ({READABLE_NAMES})") from None
        raise InputError(f"{NAME}: the archive is damaged ({one_line(str(error), 100)})") from None


def copy_capped(source: IO[bytes], target: Path, declared: int, name: str) -> None:
    """Copy at most the declared size; more bytes than declared means the index lied."""
    written = 0
    with target.open("wb") as out:
        while chunk := source.read(CHUNK_BYTES):
            written += len(chunk)
            if written > declared:
                raise InputError(f"{NAME}: {one_line(name, 80)} holds more bytes than the archive declares; refused")
            out.write(chunk)


def caption_text(raw: bytes, name: str) -> str:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{NAME}: the caption {one_line(name, 80)} is not UTF-8 text") from None
    if "\x00" in text or not all(character.isprintable() or character.isspace() for character in text):
        raise InputError(f"{NAME}: the caption {one_line(name, 80)} is not text (it holds control characters)")
    text = " ".join(text.split())
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(
            f"{NAME}: the caption {one_line(name, 80)} has {len(text)} characters; at most {MAX_PROMPT_CHARS}"
        )
    return text


def read_archive(path: Path, folder: Path) -> list[Photo]:
    """The archive's photos, copied into `folder`, each with its caption: a `.txt` of the same name beside it; in the
    order of their names. Anything else is skipped with a warning. Members are read in the archive's own order, so a
    compressed tar is inflated twice in all (its index, then its members), not once per member."""
    folder.mkdir(parents=True, exist_ok=True)
    with opened(Path(path)) as (members, open_member):
        pictures = sorted((member.name, index) for index, member in enumerate(members)
                          if is_picture(member.name) and not skipped(member.name))  # fmt: skip
        if not pictures:
            raise InputError(f"{NAME}: the archive holds no pictures ({READABLE_NAMES}); give a .zip or .tar of photos")
        if len(pictures) > MAX_TRAINING_IMAGES:
            raise InputError(f"{NAME}: {len(pictures)} pictures; at most {MAX_TRAINING_IMAGES}")
        rank = {index: position for position, (_, index) in enumerate(pictures)}
        captions: dict[str, str] = {}
        copies: dict[int, Path] = {}
        for index, member in enumerate(members):
            if index in rank:
                copies[rank[index]] = folder / f"{rank[index]:04d}{PurePosixPath(member.name).suffix.lower()}"
                with open_member(member.entry) as source:
                    copy_capped(source, copies[rank[index]], member.size, member.name)
            elif member.name.lower().endswith(CAPTION_SUFFIX) and not skipped(member.name):
                with open_member(member.entry) as source:
                    raw = source.read(MAX_CAPTION_BYTES + 1)
                if len(raw) > min(member.size, MAX_CAPTION_BYTES):
                    raise InputError(f"{NAME}: {one_line(member.name, 80)} holds more bytes than the archive declares")
                captions[stem(member.name)] = caption_text(raw, member.name)
    photos = [Photo(name, copies[position], captions.get(stem(name))) for position, (name, _) in enumerate(pictures)]
    ignored = [member.name for member in members if not is_used(member.name) and not skipped(member.name)]
    if ignored:
        log.warning("%s: ignored %d file(s) that are neither pictures nor captions: %s", NAME, len(ignored),
                    listed(ignored))  # fmt: skip
    orphans = sorted(set(captions) - {stem(name) for name, _ in pictures})
    if orphans:
        log.warning("%s: %d caption(s) without a picture of the same name: %s", NAME, len(orphans), listed(orphans))
    log.info("%s: %d pictures, %d with captions", NAME, len(photos), sum(photo.caption is not None for photo in photos))
    return photos


def stem(name: str) -> str:
    """A member's name without its suffix: a caption belongs to the picture of the same stem in the same folder."""
    return str(PurePosixPath(name.replace("\\", "/")).with_suffix(""))
