"""Reading a training's archive: photos and captions out of a .zip or .tar, and every hostile archive refused in one
line, with nothing written outside the work folder."""

import io

import pytest

from models.errors import InputError
from models.limits import MAX_ARCHIVE_MEMBERS
from models.training.archive import check_total, copy_capped, escapes, read_archive, stem
from models.training.photos import prepare
from tests.support.loras import tar_of
from tests.support.photos import compressed_tar, entry, hostile_archives, tar_entries, training_photos, zip_of

HOSTILE = hostile_archives()


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_photos_and_their_captions_come_out_of_either_kind(tmp_path, kind):
    files = training_photos()
    files["__MACOSX/photos/._p0.png"] = b"resource fork"
    files["photos/.DS_Store"] = b"finder"
    files["photos/readme.pdf"] = b"%PDF"
    archive = tmp_path / f"photos.{kind}"
    archive.write_bytes(zip_of(files) if kind == "zip" else tar_of(files))
    photos = read_archive(archive, tmp_path / "work")
    assert [photo.name for photo in photos] == ["photos/p0.png", "photos/p1.png", "photos/p2.png"]
    assert [photo.caption for photo in photos] == ["a TOK on a table", None, None]
    assert [photo.path.read_bytes() for photo in photos] == [files[photo.name] for photo in photos]
    assert sorted(path.name for path in (tmp_path / "work").iterdir()) == ["0000.png", "0001.png", "0002.png"]


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_a_compressed_tar_is_read_too(tmp_path, compression):
    archive = tmp_path / f"photos.tar.{compression}"
    archive.write_bytes(compressed_tar(training_photos(), compression))
    assert len(read_archive(archive, tmp_path / "work")) == 3


@pytest.mark.parametrize("case", list(HOSTILE))
def test_each_hostile_archive_is_refused_in_one_line_and_writes_nothing_outside(tmp_path, case):
    content, words = HOSTILE[case]
    archive = tmp_path / "upload" / "input"
    archive.parent.mkdir()
    archive.write_bytes(content)
    work = tmp_path / "deep" / "work"
    with pytest.raises(InputError) as refused:
        prepare(read_archive(archive, work), 256, "a photo of TOK,", "TOK")  # pictures are decoded by prepare
    message = str(refused.value)
    assert message.startswith("input_images: ") and words in message and "\n" not in message, message
    outside = {path for path in tmp_path.rglob("*") if work not in path.parents and path != work}
    assert outside == {archive.parent, archive, work.parent}


def test_a_tar_with_more_entries_than_the_limit_is_refused_before_reading_them_all(tmp_path):
    archive = tmp_path / "many.tar"
    archive.write_bytes(tar_entries(*(entry(f"{index}.txt") for index in range(MAX_ARCHIVE_MEMBERS + 1))))
    with pytest.raises(InputError, match="more than 2,000 entries"):
        read_archive(archive, tmp_path / "work")


@pytest.mark.parametrize(
    ("name", "escaping"),
    [("a/b.png", False), ("a/../../b.png", True), ("/b.png", True), ("\\b.png", True), ("C:b.png", True),
     ("a\\..\\b.png", True), ("a..b.png", False), ("..b.png", False)],
)  # fmt: skip
def test_escaping_names(name, escaping):
    assert escapes(name) is escaping


def test_a_caption_belongs_to_the_picture_of_the_same_stem_in_the_same_folder():
    assert stem("photos/p0.png") == stem("photos/p0.txt") != stem("p0.txt")


def test_a_caption_serves_every_picture_of_its_stem_and_members_are_read_in_the_archives_order(tmp_path):
    files = training_photos()
    files = {"photos/p2.png": files["photos/p2.png"], "photos/p0.txt": files["photos/p0.txt"],
             "photos/p0.png": files["photos/p0.png"], "photos/p0.jpg": files["photos/p1.png"]}  # fmt: skip
    archive = tmp_path / "photos.tar"
    archive.write_bytes(tar_of(files))
    photos = read_archive(archive, tmp_path / "work")
    assert [photo.name for photo in photos] == ["photos/p0.jpg", "photos/p0.png", "photos/p2.png"]
    assert [photo.caption for photo in photos] == ["a TOK on a table", "a TOK on a table", None]
    assert [photo.path.read_bytes() for photo in photos] == [files[photo.name] for photo in photos]


def test_an_archive_declaring_more_than_the_unpacked_limit_is_refused():
    with pytest.raises(InputError, match="unpacks to 9 GiB; at most 8 GiB"):
        check_total(9 * 1024**3, 4 * 1024**3)


def test_a_member_holding_more_bytes_than_its_index_declares_is_refused(tmp_path):
    """zipfile and tarfile stop at the declared size themselves; the cap is a second guard, in case one does not."""
    with pytest.raises(InputError, match="holds more bytes than the archive declares"):
        copy_capped(io.BytesIO(b"x" * 2048), tmp_path / "copy", 1024, "a.png")
